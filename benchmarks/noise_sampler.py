"""Speed of dpjax's privacy-noise samplers against the float32 JAX samplers they replace.

    python -m benchmarks.noise_sampler [--size 11000000] [--repeats 7] [--ldp_batch 16]
                                       [--out benchmarks/results/<platform>_noise_sampler.json]

Rows, each timed in the same process, alternately with its reference (so a busy machine slows
both alike), jitted, `block_until_ready`, median of `--repeats` after one untimed call:

* `normal`: `dpjax.noise.standard_normal` against `jax.random.normal`, `--size` float32 values
  (default 11M, a ResNet-18) drawn as the leaves of a ResNet-18-like tree through
  `optax.tree_utils.tree_random_like`, as `dpjax.transforms` draws DP-SGD noise.
* `ldp`: `dpjax.ldp.laplace_perturb` (discrete Laplace by table, 96-bit) against the float32
  `clip(x + beta * jax.random.laplace)` it replaced, on `--ldp_batch` 256x256x3 images.

Prints a Markdown table with the ratio (new / reference time) and writes JSON. Not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np

RESULTS_DIR = Path(__file__).parent / 'results'


def _tree(size: int) -> dict[str, tuple[int, ...]]:
  """Leaf shapes of about `size` parameters: 3x3 convolutions plus small vectors."""
  shapes, total, i = {}, 0, 0
  while total < size:
    channels = 64 * 2 ** min(i // 4, 3)
    shape = (3, 3, channels, channels)
    if total + math.prod(shape) > size:
      shape = (size - total,)
    shapes[f'conv{i}'] = shape
    shapes[f'norm{i}'] = (channels,)
    total += math.prod(shape) + channels
    i += 1
  return shapes


def _median_pair(jax, new, reference, repeats: int) -> tuple[float, float]:
  """Median seconds of `new()` and `reference()`, called alternately after one warm-up each."""
  jax.block_until_ready(new())
  jax.block_until_ready(reference())
  new_times, reference_times = [], []
  for _ in range(repeats):
    for call, times in ((new, new_times), (reference, reference_times)):
      start = time.perf_counter()
      jax.block_until_ready(call())
      times.append(time.perf_counter() - start)
  return float(np.median(new_times)), float(np.median(reference_times))


def measure_normal(size: int, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  from dpjax import noise
  params = {name: jax.ShapeDtypeStruct(shape, jnp.float32) for name, shape in _tree(size).items()}
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)

  def sampler(fn):
    # fold_in per call, as dp_sgd folds the step into the key.
    return jax.jit(lambda key, t: optax.tree_utils.tree_random_like(
        jax.random.fold_in(key, t), zeros, sampler=fn, dtype=jnp.float32))

  new, reference = sampler(noise.standard_normal), sampler(jax.random.normal)
  key, counter = jax.random.key(0), iter(range(10**9))
  new_s, reference_s = _median_pair(jax, lambda: new(key, next(counter)),
                                    lambda: reference(key, next(counter)), repeats)
  count = sum(math.prod(s.shape) for s in jax.tree.leaves(params))
  return {'row': 'normal', 'what': f'{count:,} normals (ResNet-18-like tree)',
          'new': 'dpjax.noise.standard_normal', 'reference': 'jax.random.normal',
          'new_s': new_s, 'reference_s': reference_s, 'ratio': new_s / reference_s}


def measure_ldp(batch: int, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  from dpjax import ldp
  rng = np.random.default_rng(0)  # Public synthetic pixels.
  images = jnp.asarray(rng.integers(0, 256, (batch, 256, 256, 3)).astype(np.float32) / 255)
  ids = jnp.arange(batch, dtype=jnp.int32)
  key = jax.random.key(0)

  @jax.jit
  def reference(key, images, beta, ids):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
    noise = jax.vmap(lambda k: jax.random.laplace(k, images.shape[1:], images.dtype))(keys)
    return jnp.clip(images + beta * noise, 0.0, 1.0)

  new_s, reference_s = _median_pair(jax, lambda: ldp.laplace_perturb(key, images, 1.0, ids),
                                    lambda: reference(key, images, 1.0, ids), repeats)
  return {'row': 'ldp', 'what': f'{batch} images 256x256x3',
          'new': 'dpjax.ldp.laplace_perturb', 'reference': 'clip(x + beta * jax.random.laplace)',
          'new_s': new_s, 'reference_s': reference_s, 'ratio': new_s / reference_s}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', type=int, default=11_000_000)
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--ldp_batch', type=int, default=16)
  parser.add_argument('--out', type=str, default=None)
  args = parser.parse_args(argv)
  import jax
  load_before = os.getloadavg()
  rows = [measure_normal(args.size, args.repeats), measure_ldp(args.ldp_batch, args.repeats)]
  result = {'platform': jax.default_backend(), 'device': str(jax.devices()[0].device_kind),
            'host': platform.node(), 'jax': jax.__version__, 'repeats': args.repeats,
            'load_average': {'before': list(load_before), 'after': list(os.getloadavg())},
            'rows': rows}
  print('| row | what | new (ms) | reference (ms) | ratio |')
  print('|---|---|---|---|---|')
  for row in rows:
    print(f"| {row['row']} | {row['what']} | {1e3 * row['new_s']:.1f} | "
          f"{1e3 * row['reference_s']:.1f} | {row['ratio']:.2f} |")
  out = Path(args.out) if args.out else RESULTS_DIR / f"{result['platform']}_noise_sampler.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + '\n')
  print(f'wrote {out}')
  return result


if __name__ == '__main__':
  main()
