"""Speed and memory benchmark of dpjax's training steps, with Opacus side by side.

    python -m benchmarks.run [--image_size=64 --batch_size=16 --arch=resnet18 --iters=5
                              --rows=nonprivate,dpsgd,... --out=benchmarks/results/<host>.json]

Each row builds the real step from `experiments.steps` (`make_optimizer`, `create_train_state`,
`make_train_step`, `make_eval_step`) from `experiments.configs.default.get_config()`, so it
times what `experiments.run` runs: uint8 images in, preprocessing, augmentation, forward,
backward, (clipping and noise), SGD update. One fixed random batch lives on the device; the
host input pipeline is its own row. Timing: AOT-compile (reported as compile_s), `--warmup`
untimed calls, then `--iters` calls each ended by `block_until_ready`; images/s is
batch_size / median step time.

By default every row runs in its own Python process, so its peak memory is its own:
`device_peak_bytes_in_use` (jax `memory_stats()`) on accelerators, `process_max_rss`
(`resource.getrusage`, the whole process including Python and libraries) on the CPU.
`--no-isolate` runs all rows in this process (faster; peaks are then cumulative).

The PyTorch rows (torchvision ResNet-18 with GroupNorm, plain and under Opacus) run when
torch, torchvision and opacus are importable, and are skipped with a note otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import importlib.metadata
import io
import json
import os
import platform
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np

RESULTS_DIR = Path(__file__).parent / 'results'
NUM_CLASSES = 2  # Pneumonia's head; the head size barely matters for speed.
NOISE_MULTIPLIER = 1.0  # Any fixed z: the noise costs the same whatever its scale.

COMPUTE_DTYPES = ('float32', 'bfloat16')
MALLOC_MODES = ('default', 'retain')

# Targets of the "Scale and speed" issue, evaluated on the group_norm DP-SGD row.
TARGET_DP_VS_NONPRIVATE = 0.5
TARGET_DP_VS_OPACUS = 2.0
TARGET_DP_VS_OPACUS_CPU = 1.0


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  kind: str  # 'step', 'eval', 'ldp_perturb', 'input_pipeline' or 'torch'.
  description: str
  mech: str = 'none'
  norm: str = 'group_norm'
  microbatch: bool = False
  clipping: str = 'auto'  # dpsgd rows: 'ghost' or 'vmap' (config.clipping_method).
  private: bool = False  # torch rows: Opacus or plain.


ROWS = (
    Row('nonprivate', 'step', 'non-private SGD step, group_norm', mech='none'),
    Row('dpsgd', 'step', 'DP-SGD step, ghost clipping (what runs by default), group_norm',
        mech='dpsgd', clipping='ghost'),
    Row('dpsgd_microbatch', 'step', 'DP-SGD step, ghost clipping, lax.scan over microbatches, '
        'group_norm', mech='dpsgd', microbatch=True, clipping='ghost'),
    Row('dpsgd_vmap', 'step', 'DP-SGD step, vmap per-example grads (the reference), group_norm',
        mech='dpsgd', clipping='vmap'),
    Row('dpsgd_vmap_microbatch', 'step', 'DP-SGD step, vmap per-example grads, lax.scan over '
        'microbatches, group_norm', mech='dpsgd', microbatch=True, clipping='vmap'),
    Row('nonprivate_frozen_bn', 'step', 'non-private SGD step, frozen_bn', mech='none',
        norm='frozen_bn'),
    Row('dpsgd_frozen_bn', 'step', 'DP-SGD step, ghost clipping, frozen_bn',
        mech='dpsgd', norm='frozen_bn', clipping='ghost'),
    Row('ldp_step', 'step', 'LDP training step (Laplace perturbation + SGD), group_norm',
        mech='ldp'),
    Row('ldp_perturb', 'ldp_perturb', 'LDP Laplace perturbation alone (dpjax.ldp.laplace_perturb)'),
    Row('eval', 'eval', 'evaluation forward pass (make_eval_step), group_norm'),
    Row('input_pipeline', 'input_pipeline', 'host gather of prepared uint8 records (benchmarks.input_pipeline)'),
    Row('torch_nonprivate', 'torch', 'PyTorch torchvision ResNet-18 + GroupNorm, plain SGD'),
    Row('opacus', 'torch', 'Opacus DP-SGD (hooks) on torchvision ResNet-18 + GroupNorm',
        private=True),
)
ROWS_BY_NAME = {row.name: row for row in ROWS}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--image_size', type=int, default=64, help='network input side (px)')
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--arch', default='resnet18', help="'resnet18', 'resnet8' or 'tiny' (tests)")
  parser.add_argument('--iters', type=int, default=5, help='timed steps per row')
  parser.add_argument('--warmup', type=int, default=1, help='untimed steps after compiling')
  parser.add_argument('--microbatch_size', type=int, default=0,
                      help='chunk of the microbatched DP row; 0 = largest divisor <= batch/4')
  parser.add_argument('--rows', default=','.join(row.name for row in ROWS),
                      help='comma-separated subset of: ' + ', '.join(ROWS_BY_NAME))
  parser.add_argument('--pipeline_images', type=int, default=0,
                      help='records prepared for the input-pipeline row; 0 = max(4 * batch, 256)')
  parser.add_argument('--isolate', action=argparse.BooleanOptionalAction, default=True,
                      help='one process per row (own peak memory, no state shared)')
  parser.add_argument('--row_timeout', type=float, default=0,
                      help='seconds before an isolated row process is stopped and marked failed; 0 = none')
  parser.add_argument('--compute_dtype', default='float32', choices=COMPUTE_DTYPES,
                      help="config.compute_dtype of the dpjax rows (bfloat16: activations and "
                      "matmuls; params, norms, clipping, noise float32); torch rows stay float32")
  parser.add_argument('--malloc', default='default', choices=MALLOC_MODES,
                      help="'retain': every row process first calls retain_freed_memory() (glibc: "
                      "one heap, no mmap, no trimming), so step buffers are not page-faulted in "
                      "anew each step; 'default': glibc's own settings")
  parser.add_argument('--compile_only', action='store_true',
                      help='compile the JAX rows and report XLA buffer sizes without running them')
  parser.add_argument('--out', default='', help='JSON path; empty = benchmarks/results/<host>_<size>px_b<batch>.json')
  parser.add_argument('--row_child', default='', help=argparse.SUPPRESS)  # Internal: run one row.
  parser.add_argument('--row_out', default='', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  unknown = [name for name in args.rows.split(',') if name not in ROWS_BY_NAME]
  if unknown:
    parser.error(f'--rows has unknown {unknown}; expected names from {list(ROWS_BY_NAME)}')
  for name in ('image_size', 'batch_size', 'iters'):
    if getattr(args, name) <= 0:
      parser.error(f'--{name} must be a positive integer, got {getattr(args, name)}')
  if args.warmup < 0:
    parser.error(f'--warmup must be >= 0, got {args.warmup}')
  if args.microbatch_size and args.batch_size % args.microbatch_size:
    parser.error(f'Expected --batch_size={args.batch_size} to be a multiple of '
                 f'--microbatch_size={args.microbatch_size}')
  return args


def default_microbatch_size(batch_size: int) -> int:
  """The largest divisor of batch_size that is at most batch_size / 4 (at least 1)."""
  return max(d for d in range(1, max(1, batch_size // 4) + 1) if batch_size % d == 0)


def retain_freed_memory() -> bool:
  """Makes glibc keep freed memory mapped, so large buffers are not page-faulted in again.

  XLA's CPU runtime allocates each step's buffers (2.7 GB of temporaries for the non-private
  ResNet-18 step at 224 px, batch 32) with malloc and frees them after the step. glibc serves
  such sizes with fresh mmaps (thread arenas fall back to mmap even with M_MMAP_MAX=0), so
  every step page-faults all of it in again: about 690,000 minor faults, and half of that
  step's time on this project's 2-core Xeon. With one arena (M_ARENA_MAX=1), no mmap
  (M_MMAP_MAX=0) and no trimming (M_TRIM_THRESHOLD=SIZE_MAX) the heap keeps its pages and
  later steps fault none. Call it at start-up, before JAX starts its threads and allocates;
  nothing is computed differently. The process's memory then stays at its peak. Returns
  whether glibc accepted all three settings (False off glibc).
  """
  try:
    libc = ctypes.CDLL('libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's <malloc.h> constants.
  # -1 converts to SIZE_MAX in glibc's (size_t) trim threshold: never trim.
  return all(mallopt(option, ctypes.c_int(value)) == 1 for option, value in (
      (m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, -1)))


# ----------------------------------------------------------------------------- JAX rows


def _jax_memory(jax) -> tuple[int, str]:
  stats = jax.local_devices()[0].memory_stats()
  if stats and 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device_peak_bytes_in_use'
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'process_max_rss'


def _jax_device(jax) -> dict[str, str]:
  device = jax.local_devices()[0]
  return {'device': device.device_kind, 'platform': device.platform}


def _synthetic_batch(batch_size: int, prep_size: int, num_classes: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)  # Public benchmark pixels, nothing private.
  return {'images': rng.integers(0, 256, (batch_size, prep_size, prep_size, 3), dtype=np.uint8),
          'labels': rng.integers(0, num_classes, batch_size).astype(np.int32),
          'ids': np.arange(batch_size, dtype=np.int32),
          'stable_ids': np.arange(batch_size, dtype=np.uint32),
          'mask': np.ones(batch_size, bool)}


def _config(args, row: Row):
  from experiments.configs import default
  config = default.get_config()
  config.mech = row.mech
  config.norm = row.norm
  config.arch = args.arch
  config.image_size = args.image_size
  config.batch_size = args.batch_size
  config.eval_batch_size = args.batch_size
  config.microbatch_size = (args.microbatch_size or default_microbatch_size(args.batch_size)
                            if row.microbatch else 0)
  config.clipping_method = row.clipping
  config.noise_multiplier = NOISE_MULTIPLIER  # Fixed z: no calibration needed to time a step.
  config.weights = 'none'
  config.progress = False
  config.compute_dtype = args.compute_dtype
  return config


def _time_jax(jax, call: Callable[[], Any], iters: int, warmup: int) -> list[float]:
  for _ in range(warmup):
    jax.block_until_ready(call())
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return times


def _xla_buffers(compiled) -> dict[str, int]:
  """XLA's own buffer sizes of the compiled step: what its device memory must hold at once.

  arguments + outputs - donated aliases + temporaries (the peak of the buffer assignment).
  On the CPU this is the compiler's plan for the CPU; GPU buffer assignment differs somewhat.
  """
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
           - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
  return {'xla_buffer_bytes': int(total), 'xla_temp_bytes': int(analysis.temp_size_in_bytes)}


def measure_jax_step(args, row: Row) -> dict[str, Any]:
  """Compiles and times one dpjax train (or eval) step built exactly as training builds it."""
  import jax
  import jax.numpy as jnp
  from dpjax import models
  from experiments import config_checks, parallel, privacy_plan, steps
  from dpjax.data import datasets

  config = _config(args, row)
  config_checks.validate_config(config)
  # As experiments.train builds it: float32 parameters, compute_dtype activations and matmuls.
  model = models.create_model(NUM_CLASSES, row.norm, arch=args.arch,
                              dtype=jnp.dtype(config.compute_dtype))
  # One jitted init with an 'rbg' key: the same initial distributions, compiled in a fraction
  # of the time that eager threefry init takes on CPU (initialisation is not timed anyway).
  init = jax.jit(model.init, static_argnames='train')
  variables = init(jax.random.key(0, impl='rbg'),
                   jnp.zeros((1, args.image_size, args.image_size, 3)), train=False)
  mesh = parallel.make_mesh()  # All local devices, as training uses them.
  batch = parallel.shard_batch(
      _synthetic_batch(args.batch_size, datasets.prep_size_for(args.image_size), NUM_CLASSES),
      args.batch_size, mesh)
  extra = {'microbatch_size': config.microbatch_size or None, 'num_devices': parallel.num_shards(mesh)}
  if row.kind == 'eval':
    params, batch_stats = parallel.replicate(
        (variables['params'], variables.get('batch_stats', {})), mesh)
    jitted, call_args = steps.make_eval_step(model, config, mesh), (params, batch_stats, batch)
  else:
    plan = privacy_plan.PrivacyPlan(mech=row.mech, noise_multiplier=NOISE_MULTIPLIER if row.mech == 'dpsgd' else None)
    private_key = jax.random.key(1)  # Benchmark noise: timing only, nothing to protect.
    tx = steps.make_optimizer(config, plan, steps.private_stream(private_key, steps.NOISE))
    state = parallel.replicate(
        steps.create_train_state(variables, tx, config.seed, private_key), mesh)
    jitted, call_args = steps.make_train_step(model, tx, config, plan, row.norm, mesh), (state, batch)
  start = time.perf_counter()
  compiled = jitted.lower(*call_args).compile()
  compile_s = time.perf_counter() - start
  extra.update(_xla_buffers(compiled))
  if args.compile_only:
    return {'step_s': None, 'compile_s': compile_s, **extra, **_jax_device(jax)}
  if row.kind == 'eval':
    times = _time_jax(jax, lambda: compiled(*call_args), args.iters, args.warmup)
    loss = float(jnp.mean(compiled(*call_args)[0]))
  else:
    holder = {'state': state}

    def call():
      holder['state'], metrics = compiled(holder['state'], batch)  # The state is donated.
      holder['metrics'] = metrics
      return holder['state'], metrics

    times = _time_jax(jax, call, args.iters, args.warmup)
    loss = float(holder['metrics']['loss_sum']) / args.batch_size
  peak, memory_kind = _jax_memory(jax)
  return {'step_s': times, 'compile_s': compile_s, 'peak_memory_bytes': peak,
          'memory_kind': memory_kind, 'final_loss': loss, **extra, **_jax_device(jax)}


def measure_ldp_perturb(args, row: Row) -> dict[str, Any]:
  """Times dpjax.ldp.laplace_perturb on a batch of [0, 1] images at the stored size."""
  import jax
  from dpjax import ldp
  from dpjax.data import datasets, preprocess
  batch = _synthetic_batch(args.batch_size, datasets.prep_size_for(args.image_size), NUM_CLASSES)
  images = jax.block_until_ready(preprocess.to_unit_float(jax.device_put(batch['images'])))
  ids = jax.device_put(batch['ids'])
  key = jax.random.key(0)
  start = time.perf_counter()
  jax.block_until_ready(ldp.laplace_perturb(key, images, 1.0, ids))  # Compiles on first call.
  first_call_s = time.perf_counter() - start
  times = _time_jax(jax, lambda: ldp.laplace_perturb(key, images, 1.0, ids), args.iters,
                    args.warmup)
  peak, memory_kind = _jax_memory(jax)
  return {'step_s': times, 'compile_s': max(0.0, first_call_s - float(np.median(times))),
          'peak_memory_bytes': peak, 'memory_kind': memory_kind, **_jax_device(jax)}


def measure_input_pipeline(args, row: Row) -> dict[str, Any]:
  """Runs benchmarks.input_pipeline (someone else's script) at this run's stored image size."""
  from benchmarks import input_pipeline
  from dpjax.data import datasets
  num_images = args.pipeline_images or max(4 * args.batch_size, 256)
  with tempfile.TemporaryDirectory(prefix='dpjax-bench-pipeline-') as tmp:
    results_path = Path(tmp) / 'input_pipeline.json'
    saved = input_pipeline.RESULTS, sys.argv
    input_pipeline.RESULTS = results_path  # Keep its own results file untouched.
    sys.argv = ['input_pipeline', '--num_images', str(num_images),
                '--prep_size', str(datasets.prep_size_for(args.image_size)),
                '--batch', str(args.batch_size), '--repeats', str(max(args.iters, 10))]
    try:
      with contextlib.redirect_stdout(io.StringIO()):
        input_pipeline.main()
    finally:
      input_pipeline.RESULTS, sys.argv = saved
    result = json.loads(results_path.read_text())
  return {'images_per_s': result['images_per_s_median'],
          'step_s': [result['batch_ms_median'] / 1e3],
          'setup_s': result['write_folder_s'] + result['prepare_s'],
          'records': result['num_records'], 'prep_size': result['prep_size'],
          'peak_memory_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          'memory_kind': 'process_max_rss', 'device': 'host', 'platform': 'host'}


def measure_torch(args, row: Row) -> dict[str, Any]:
  from benchmarks import opacus_step
  result = opacus_step.measure(private=row.private, image_size=args.image_size,
                               batch_size=args.batch_size, num_classes=NUM_CLASSES,
                               iters=args.iters, warmup=max(1, args.warmup),
                               noise_multiplier=NOISE_MULTIPLIER)
  result['compile_s'] = max(0.0, result.pop('first_step_s') - float(np.median(result['step_s'])))
  return result


MEASURES = {'step': measure_jax_step, 'eval': measure_jax_step,
            'ldp_perturb': measure_ldp_perturb, 'input_pipeline': measure_input_pipeline,
            'torch': measure_torch}


def skip_reason(args, row: Row) -> str | None:
  if args.compile_only and row.kind not in ('step', 'eval'):
    return 'skipped: --compile_only times nothing'
  if row.kind == 'torch':
    from benchmarks import opacus_step
    missing = opacus_step.missing_packages()
    if missing:
      return f'skipped: {", ".join(missing)} not installed (pip install torch torchvision opacus)'
    if args.arch != 'resnet18':
      return f'skipped: the PyTorch rows exist for arch=resnet18 only, got arch={args.arch}'
    if args.compute_dtype != 'float32':
      return f'skipped: the PyTorch rows run float32 only, got --compute_dtype={args.compute_dtype}'
  if row.kind == 'input_pipeline':
    import importlib.util
    if importlib.util.find_spec('benchmarks.input_pipeline') is None:
      return 'skipped: benchmarks/input_pipeline.py not found'
  return None


def measure_row(args, row: Row) -> dict[str, Any]:
  """Runs one row here and returns its finished record (never raises for a failed row)."""
  record = {'name': row.name, 'description': row.description}
  reason = skip_reason(args, row)
  if reason:
    return {**record, 'status': 'skipped', 'note': reason}
  try:
    result = MEASURES[row.kind](args, row)
  except Exception as error:  # A failed row must not lose the others' numbers.
    return {**record, 'status': 'failed', 'note': f'{type(error).__name__}: {error}'}
  if result.get('step_s') is None:  # --compile_only.
    return {**record, 'status': 'compiled', **result}
  median = float(np.median(result['step_s']))
  result.setdefault('images_per_s', args.batch_size / median)
  return {**record, 'status': 'ok', 'step_ms_median': 1e3 * median, **result}


def measure_row_isolated(args, row: Row, argv: list[str]) -> dict[str, Any]:
  """Runs one row in a fresh Python process so its peak memory is its own."""
  with tempfile.TemporaryDirectory(prefix='dpjax-bench-row-') as tmp:
    out = Path(tmp) / 'row.json'
    command = [sys.executable, '-m', 'benchmarks.run', *argv, f'--row_child={row.name}',
               f'--row_out={out}']
    try:
      process = subprocess.run(command, cwd=Path(__file__).resolve().parent.parent,
                               capture_output=True, text=True, timeout=args.row_timeout or None)
    except subprocess.TimeoutExpired:
      return {'name': row.name, 'description': row.description, 'status': 'failed',
              'note': f'row process stopped after --row_timeout={args.row_timeout:g} s'}
    if process.returncode != 0 or not out.exists():
      tail = ' | '.join(process.stderr.strip().splitlines()[-3:])
      return {'name': row.name, 'description': row.description, 'status': 'failed',
              'note': f'row process exited with {process.returncode}: {tail}'}
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- report


def _images_per_s(rows: dict[str, dict], name: str) -> float | None:
  row = rows.get(name)
  return row['images_per_s'] if row and row.get('status') == 'ok' else None


def ratios_and_targets(rows: dict[str, dict], platform_name: str | None) -> tuple[dict, dict]:
  """Throughput ratios between rows, and whether the issue's targets are met."""
  pairs = {
      'dpsgd / nonprivate': ('dpsgd', 'nonprivate'),
      'dpsgd_microbatch / nonprivate': ('dpsgd_microbatch', 'nonprivate'),
      'dpsgd_vmap / nonprivate': ('dpsgd_vmap', 'nonprivate'),
      'dpsgd / dpsgd_vmap': ('dpsgd', 'dpsgd_vmap'),
      'dpsgd_frozen_bn / nonprivate_frozen_bn': ('dpsgd_frozen_bn', 'nonprivate_frozen_bn'),
      'ldp_step / nonprivate': ('ldp_step', 'nonprivate'),
      'dpsgd / opacus': ('dpsgd', 'opacus'),
      'dpsgd_microbatch / opacus': ('dpsgd_microbatch', 'opacus'),
      'nonprivate / torch_nonprivate': ('nonprivate', 'torch_nonprivate'),
      'opacus / torch_nonprivate': ('opacus', 'torch_nonprivate'),
  }
  ratios = {}
  for label, (top, bottom) in pairs.items():
    a, b = _images_per_s(rows, top), _images_per_s(rows, bottom)
    ratios[label] = a / b if a is not None and b is not None else None

  def target(ratio_name, threshold, text):
    value = ratios[ratio_name]
    return {'ratio': ratio_name, 'threshold': threshold, 'value': value, 'text': text,
            'met': None if value is None else bool(value >= threshold)}

  targets = {'dp_vs_nonprivate': target('dpsgd / nonprivate', TARGET_DP_VS_NONPRIVATE,
                                        'DP-SGD >= 0.5x the non-private step of the same model')}
  if platform_name == 'cpu':
    targets['dp_vs_opacus_cpu'] = target('dpsgd / opacus', TARGET_DP_VS_OPACUS_CPU,
                                         'on CPU, DP-SGD faster than Opacus')
  else:
    targets['dp_vs_opacus'] = target('dpsgd / opacus', TARGET_DP_VS_OPACUS,
                                     'DP-SGD >= 2x Opacus on the same accelerator')
  return ratios, targets


def _fmt(value, spec: str) -> str:
  return '-' if value is None else format(value, spec)


def format_report(result: dict[str, Any]) -> str:
  lines = [f"dpjax benchmark: {result['device']} ({result['platform']}), arch={result['config']['arch']}, "
           f"{result['config']['image_size']} px, batch {result['config']['batch_size']}, "
           f"{result['config'].get('compute_dtype', 'float32')}, malloc={result['config'].get('malloc', 'default')}, "
           + ('compiled only, nothing run' if result['config'].get('compile_only')
              else f"median of {result['config']['iters']} steps"),
           '',
           '| row | images/s | step ms (median) | compile s | peak memory MB | memory kind | '
           'XLA buffers MB | note |',
           '|---|---:|---:|---:|---:|---|---:|---|']
  for row in result['rows']:
    xla_mb = _fmt(row['xla_buffer_bytes'] / 2**20 if 'xla_buffer_bytes' in row else None, '.0f')
    if row['status'] == 'compiled':
      lines.append(f"| {row['name']} | - | - | {row['compile_s']:.1f} | - | - | {xla_mb} | "
                   'compiled only |')
      continue
    if row['status'] != 'ok':
      lines.append(f"| {row['name']} | - | - | - | - | - | - | {row['note']} |")
      continue
    note = f"microbatch {row['microbatch_size']}" if row.get('microbatch_size') else ''
    if row['name'] == 'input_pipeline':
      note = f"{row['records']} records at {row['prep_size']} px, prepared in {row['setup_s']:.1f} s"
    lines.append(f"| {row['name']} | {row['images_per_s']:.1f} | {row['step_ms_median']:.1f} | "
                 f"{_fmt(row.get('compile_s'), '.1f')} | {row['peak_memory_bytes'] / 2**20:.0f} | "
                 f"{row['memory_kind']} | {xla_mb} | {note} |")
  lines += ['', '| ratio of images/s | value |', '|---|---:|']
  lines += [f'| {name} | {_fmt(value, ".2f")} |' for name, value in result['ratios'].items()]
  lines += ['', 'targets:']
  for target in result['targets'].values():
    verdict = {True: 'MET', False: 'NOT MET', None: 'not measured'}[target['met']]
    lines.append(f"  {target['text']}: {target['ratio']} = {_fmt(target['value'], '.2f')} "
                 f"(need >= {target['threshold']}) -> {verdict}")
  load = result['load_average']
  lines.append(f"load average (1 min) before {load['before'][0]:.2f}, after {load['after'][0]:.2f} "
               f"on {result['host']['cpu_count']} cores")
  return '\n'.join(lines)


def _cpu_model() -> str:
  with contextlib.suppress(OSError):
    for line in Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  return platform.processor() or platform.machine()


def _versions() -> dict[str, str | None]:
  versions = {'python': platform.python_version()}
  for package in ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'torch', 'torchvision', 'opacus'):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = None
  return versions


def host_slug() -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '-', socket.gethostname()) or 'host'


def run(args, argv: list[str], on_row: Callable[[dict], None] = lambda result: None) -> dict[str, Any]:
  """Measures every requested row and returns the whole report as a JSON-able dict.

  `on_row` receives the report so far after each row (to save partial results).
  """
  load_before = os.getloadavg()
  started = datetime.datetime.now(datetime.UTC)
  records = []
  names = args.rows.split(',')
  for name in names:
    row = ROWS_BY_NAME[name]
    print(f'  measuring {name} ...', file=sys.stderr, flush=True)
    records.append(measure_row_isolated(args, row, argv) if args.isolate else measure_row(args, row))
    if len(records) < len(names):
      on_row(_report(args, records, load_before, started, complete=False))
  return _report(args, records, load_before, started, complete=True)


def _report(args, records, load_before, started, complete: bool) -> dict[str, Any]:
  rows = {record['name']: record for record in records}
  # Parent never initialises a JAX backend (it would grab accelerator memory the row
  # processes need); the device comes from the rows.
  jax_rows = [r for r in records if r.get('status') in ('ok', 'compiled')
              and r['platform'] not in ('host',)
              and r['name'] not in ('torch_nonprivate', 'opacus')]
  device_rows = jax_rows or [r for r in records if r.get('status') == 'ok'
                             and r['platform'] != 'host']
  device = device_rows[0]['device'] if device_rows else 'unknown'
  platform_name = {'cuda': 'gpu'}.get(device_rows[0]['platform'], device_rows[0]['platform']) if device_rows else None
  ratios, targets = ratios_and_targets(rows, platform_name)
  return {
      'complete': complete,
      'date_utc': started.isoformat(timespec='seconds'),
      'device': device, 'platform': platform_name,
      'host': {'name': socket.gethostname(), 'cpu_model': _cpu_model(), 'cpu_count': os.cpu_count(),
               'machine': platform.machine()},
      'versions': _versions(),
      'config': {'arch': args.arch, 'image_size': args.image_size, 'batch_size': args.batch_size,
                 'iters': args.iters, 'warmup': args.warmup, 'num_classes': NUM_CLASSES,
                 'noise_multiplier': NOISE_MULTIPLIER, 'isolated_rows': args.isolate,
                 'compute_dtype': args.compute_dtype, 'malloc': args.malloc,
                 'compile_only': args.compile_only,
                 'dpjax_input': 'uint8 images at prep_size on device; to_float, augment, crop, normalise inside the step'},
      'load_average': {'before': list(load_before), 'after': list(os.getloadavg())},
      'rows': records, 'ratios': ratios, 'targets': targets,
      'notes': ['images/s = batch_size / median step time, after compiling and warm-up',
                'process_max_rss covers the whole row process (Python, libraries, data); '
                'device_peak_bytes_in_use and torch.cuda.max_memory_allocated count device buffers only',
                f'wall_s: {(datetime.datetime.now(datetime.UTC) - started).total_seconds():.0f}'],
  }


def child_argv(args) -> list[str]:
  """The flags a row process needs to measure exactly what this run measures."""
  names = ('image_size', 'batch_size', 'arch', 'iters', 'warmup', 'microbatch_size', 'pipeline_images',
           'compute_dtype', 'malloc')
  return [f'--{name}={getattr(args, name)}' for name in names] + (
      ['--compile_only'] if args.compile_only else [])


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.malloc == 'retain' and (args.row_child or not args.isolate):
    if not retain_freed_memory():  # Before any row imports JAX.
      print('warning: --malloc=retain: glibc mallopt not available or refused', file=sys.stderr)
  if args.row_child:  # Internal: one row in this (fresh) process, result to --row_out.
    record = measure_row(args, ROWS_BY_NAME[args.row_child])
    Path(args.row_out).write_text(json.dumps(record))
    return None
  # A `timeout` on this process raises SystemExit here, and subprocess.run then kills the row
  # process instead of leaving it running (and holding the accelerator).
  if args.isolate:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
  suffix = '' if args.compute_dtype == 'float32' else '_bf16'
  out = Path(args.out or RESULTS_DIR / f'{host_slug()}_{args.arch}_{args.image_size}px_b{args.batch_size}{suffix}.json')
  out.parent.mkdir(parents=True, exist_ok=True)

  def save(result):
    out.write_text(json.dumps(result, indent=1, allow_nan=False) + '\n')

  result = run(args, child_argv(args), on_row=save)
  print(format_report(result))
  save(result)
  print(f'wrote {out}')
  return result


if __name__ == '__main__':
  main()
