"""The DP-SGD train step: ghost and vmap clipping take the same step; method selection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import models
from dpjax.data import datasets
from experiments import config_checks
from experiments import parallel
from experiments import privacy_plan
from experiments import steps
from experiments.config_checks import ConfigError
from experiments.configs import default


def _config(**overrides):
  config = default.get_config()
  config.update({'arch': 'tiny', 'image_size': 32, 'batch_size': 8, 'eval_batch_size': 8,
                 'microbatch_size': 4, 'weights': 'none', 'progress': False, 'mech': 'dpsgd',
                 'l2_norm_clip': 0.5, **overrides})
  return config


def _one_step(config, norm, num_steps=1):
  model = models.create_model(2, norm, arch='tiny', dtype=jnp.dtype(config.compute_dtype))
  variables = jax.jit(model.init, static_argnames='train')(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  plan = privacy_plan.PrivacyPlan(mech='dpsgd', noise_multiplier=0.0)  # Compare the clipped sums.
  private_key = jax.random.key(1)  # A test key: the two methods must see the same noise.
  tx = steps.make_optimizer(config, plan, steps.private_stream(private_key, steps.NOISE))
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  prep = datasets.prep_size_for(32)
  batch = parallel.shard_batch({
      'images': rng.integers(0, 256, (8, prep, prep, 3), dtype=np.uint8),
      'labels': rng.integers(0, 2, 8).astype(np.int32),
      'ids': np.arange(8, dtype=np.int32),
      'stable_ids': np.arange(8, dtype=np.uint32),
      'mask': np.arange(8) < 6}, 8, mesh)
  state = parallel.replicate(steps.create_train_state(variables, tx, config.seed, private_key), mesh)
  step = steps.make_train_step(model, tx, config, plan, norm, mesh)
  losses = []
  for _ in range(num_steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss_sum']))
  return state, {**metrics, 'losses': losses}


def test_ghost_and_vmap_steps_agree(norm='group_norm'):
  # (Frozen BN: compared at the clipping level in ghost_clipping_test.)
  ghost_state, ghost_metrics = _one_step(_config(clipping_method='ghost'), norm)
  vmap_state, vmap_metrics = _one_step(_config(clipping_method='vmap'), norm)
  for got, want in zip(jax.tree.leaves(ghost_state.params), jax.tree.leaves(vmap_state.params)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  for name in ('loss_sum', 'correct', 'count', 'units', 'num_clipped', 'sum_norms'):
    np.testing.assert_allclose(ghost_metrics[name], vmap_metrics[name], rtol=1e-4)
  assert float(ghost_metrics['count']) == 6


def test_auto_picks_ghost_only_for_single_example_units():
  assert config_checks.resolve_clipping_method(_config(), 'group_norm') == 'ghost'
  assert config_checks.resolve_clipping_method(_config(), 'frozen_bn') == 'ghost'
  assert config_checks.resolve_clipping_method(_config(clip_group_size=4), 'group_norm') == 'vmap'
  assert config_checks.resolve_clipping_method(_config(protocol='paper'), 'batch_norm') == 'vmap'
  assert config_checks.resolve_clipping_method(_config(clipping_method='vmap'), 'group_norm') == 'vmap'


@pytest.mark.parametrize('overrides', [
    {'clipping_method': 'ghost', 'clip_group_size': 4, 'sampling': 'shuffled'},
    {'clipping_method': 'ghost', 'norm': 'batch_norm', 'protocol': 'paper'},
    {'clipping_method': 'fast'},
])
def test_ghost_refused_where_units_are_not_single_examples(overrides):
  with pytest.raises(ConfigError, match='--clipping_method'):
    config_checks.validate_config(_config(**overrides))


def test_bfloat16_step_trains_like_float32_with_float32_parameters_and_state():
  trajectories = {}
  for dtype in ('float32', 'bfloat16'):
    config = _config(compute_dtype=dtype, learning_rate=0.5, l2_norm_clip=10.0)
    state, metrics = _one_step(config, 'group_norm', num_steps=10)
    trajectories[dtype] = np.asarray(metrics['losses'])
  # Activations and matmuls in bfloat16; parameters, noise and optimizer state in float32.
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.opt_state)
             if jnp.issubdtype(leaf.dtype, jnp.floating))
  bf16, f32 = trajectories['bfloat16'], trajectories['float32']
  assert bf16[-1] < 0.9 * bf16[0], bf16  # It fits the batch...
  np.testing.assert_allclose(bf16, f32, rtol=0.03)  # ...step by step like float32.


def test_one_nonfinite_example_neither_poisons_the_loss_nor_stops_the_run():
  sums = steps._masked_sums(jnp.array([0.5, jnp.nan, 1.0, jnp.inf]),
                            jnp.array([True, False, True, False]),
                            jnp.array([True, True, True, False]))
  assert float(sums['loss_sum']) == 1.5 and int(sums['nonfinite_examples']) == 1
  steps.check_finite({'loss_sum': 1.5, 'params_nonfinite': False}, step=3)
  with pytest.raises(steps.TrainingDiverged):
    steps.check_finite({'loss_sum': 1.5, 'params_nonfinite': True}, step=3)
