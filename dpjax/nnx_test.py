"""dp_sgd with flax NNX: the documented nnx.Optimizer path (docs/USING_DP_SGD.md, "flax NNX")."""

import contextlib
import io
import re
from pathlib import Path

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax import transforms

DOCS = Path(__file__).resolve().parents[1] / 'docs' / 'USING_DP_SGD.md'
MARKER = '<!-- nnx example -->'


def _optimizer(model, *, clip, z, expected_batch_size, lr=1.0):
  tx = optax.chain(
      transforms.dp_sgd(clip, noise_multiplier=z, key=jax.random.key(3),  # test key
                        expected_batch_size=expected_batch_size),
      optax.sgd(lr))
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


def _per_example_grads(model, x):
  """jax.vmap(jax.grad) of a one-example loss over nnx.split's Param state, as documented."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, x):
    return jnp.sum(nnx.merge(graphdef, params, rest)(x) ** 2)

  return jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, x)


def _param_arrays(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_the_documented_nnx_example_runs_and_trains_privately():
  text = DOCS.read_text()
  block = re.search(re.escape(MARKER) + r'\s*```python\n(.*?)```', text, re.DOTALL)
  assert block, f'no NNX example block in {DOCS}'
  namespace, out = {}, io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(block.group(1), str(DOCS), 'exec'), namespace)  # pylint: disable=exec-used
  assert namespace['epsilon'] <= 2.0 + 1e-6
  assert namespace['ledger'].num_steps == 200
  assert int(namespace['optimizer'].step[...]) == 200
  assert namespace['accuracy'] > 0.75  # It learns.
  assert 'DP' in out.getvalue()


def test_optimizer_update_strips_the_wrapper_and_the_error_names_nnx_update():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  optimizer = _optimizer(model, clip=1.0, z=0.0, expected_batch_size=2)
  grads = _per_example_grads(model, jnp.ones((4, 3)))
  private = transforms.PerExampleGrads(grads, jnp.array([True, True, False, False]))
  with pytest.raises(ValueError, match=r'got State: flax nnx\.Optimizer\.update .*nnx_update'):
    optimizer.update(model, private)
  with pytest.raises(ValueError, match='nnx_update expects dpjax.PerExampleGrads'):
    transforms.nnx_update(optimizer, model, grads)


def test_padding_rows_contribute_nothing_and_the_update_is_the_clipped_mean():
  clip, expected = 0.5, 3.0
  rng = np.random.default_rng(0)  # test data only
  real = rng.normal(size=(2, 4)).astype(np.float32)
  padding = np.full((3, 4), 1e6, np.float32)  # huge rows: any leak would show
  updates = {}
  for name, (x, mask) in {'padded': (np.concatenate([real, padding]), [True] * 2 + [False] * 3),
                          'real only': (real, [True, True])}.items():
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(1))
    before = _param_arrays(model)
    grads = _per_example_grads(model, jnp.asarray(x))
    optimizer = _optimizer(model, clip=clip, z=0.0, expected_batch_size=expected)
    returned = transforms.nnx_update(
        optimizer, model, transforms.PerExampleGrads(grads, jnp.asarray(mask)))
    after = _param_arrays(model)
    updates[name] = jax.tree.map(lambda a, b: a - b, after, before)
    assert int(optimizer.step[...]) == 1
    np.testing.assert_allclose(np.asarray(returned['kernel']), updates[name]['kernel'],
                               atol=1e-6)
    if name == 'real only':  # Known answer: -(sum of per-example grads clipped to C) / E.
      per_example = [jax.tree.map(lambda g, b=b: np.asarray(g[b]), nnx.to_pure_dict(grads))
                     for b in range(2)]
      want = jax.tree.map(lambda *gs: 0 * gs[0], *per_example)
      for g in per_example:
        norm = np.sqrt(sum(np.sum(leaf ** 2) for leaf in jax.tree.leaves(g)))
        want = jax.tree.map(lambda w, leaf, norm=norm: w + leaf * min(1.0, clip / norm), want, g)
      for key in ('kernel', 'bias'):
        np.testing.assert_allclose(updates[name][key], -want[key] / expected, rtol=1e-5,
                                   atol=1e-7)
  for key in ('kernel', 'bias'):
    np.testing.assert_array_equal(updates['padded'][key], updates['real only'][key])


def test_the_noise_on_the_update_has_std_z_c_over_e():
  clip, z, expected = 0.5, 2.0, 4.0
  model = nnx.Linear(64, 32, rngs=nnx.Rngs(2))  # 2080 coordinates
  before = _param_arrays(model)
  optimizer = _optimizer(model, clip=clip, z=z, expected_batch_size=expected)
  grads = _per_example_grads(model, jnp.ones((4, 64)))
  # Every row is padding: the update is the noise alone, -N(0, (zC)^2) / E per coordinate.
  transforms.nnx_update(optimizer, model, transforms.PerExampleGrads(grads, jnp.zeros(4, bool)))
  after = _param_arrays(model)
  noise = np.concatenate([(after[k] - before[k]).ravel() for k in ('kernel', 'bias')])
  want = z * clip / expected  # 0.25
  # The sample std of 2080 normals has relative sd 1/sqrt(2 * 2080) = 1.6%: 6 sd below 10%.
  assert abs(noise.std() / want - 1) < 0.1, noise.std()
  assert abs(noise.mean()) < 6 * want / np.sqrt(noise.size)
  # A second update draws fresh noise (key folded with the step).
  transforms.nnx_update(optimizer, model, transforms.PerExampleGrads(grads, jnp.zeros(4, bool)))
  second = _param_arrays(model)['kernel'] - after['kernel']
  assert abs(np.corrcoef(second.ravel(), (after['kernel'] - before['kernel']).ravel())[0, 1]) < 0.15
