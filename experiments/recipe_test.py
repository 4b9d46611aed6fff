"""The modern DP fine-tuning recipe's parts, through the real train step: parameter averaging,
frozen parameters, augmentation multiplicity and virtual batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import models
from dpjax.data import datasets
from experiments import parallel
from experiments import privacy_plan
from experiments import steps
from experiments.configs import default


def _config(**overrides):
  config = default.get_config()
  config.update({'arch': 'tiny', 'image_size': 32, 'batch_size': 8, 'eval_batch_size': 8,
                 'microbatch_size': 4, 'weights': 'none', 'progress': False, 'mech': 'dpsgd',
                 'l2_norm_clip': 1.0, 'learning_rate': 0.3, 'weight_decay': 0.0,
                 **overrides})
  return config


def _batch(rows: int, mesh, seed=0):
  rng = np.random.default_rng(seed)
  prep = datasets.prep_size_for(32)
  return parallel.shard_batch({
      'images': rng.integers(0, 256, (rows, prep, prep, 3), dtype=np.uint8),
      'labels': rng.integers(0, 2, rows).astype(np.int32),
      'ids': np.arange(rows, dtype=np.int32),
      'stable_ids': np.arange(rows, dtype=np.uint32) * 7919,
      'mask': np.arange(rows) < rows - 2}, rows, mesh)


def _build(config, noise_multiplier=0.0):
  model = models.create_model(2, 'group_norm', arch='tiny')
  variables = jax.jit(model.init, static_argnames='train')(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  plan = privacy_plan.PrivacyPlan(mech=config.mech, noise_multiplier=noise_multiplier)
  private_key = jax.random.key(1)
  tx = steps.make_optimizer(config, plan, steps.private_stream(private_key, steps.NOISE))
  mesh = parallel.make_mesh()
  state = parallel.replicate(steps.create_train_state(
      variables, tx, config.seed, private_key, trainable=config.trainable,
      averaging=config.averaging), mesh)
  return state, steps.make_train_step(model, tx, config, plan, 'group_norm', mesh), mesh


def _copy(tree):
  return jax.tree.map(lambda x: np.array(jax.device_get(x)), tree)


def test_averages_equal_their_closed_forms_on_a_toy_sequence():
  iterates = [np.array([0.0, 1.0]), np.array([2.0, -1.0]), np.array([4.0, 3.0]),
              np.array([-2.0, 5.0])]
  decay = 0.9
  ema, polyak = iterates[0], iterates[0]
  for t, params in enumerate(iterates[1:], start=1):
    ema = steps.update_average(ema, params, t, averaging='ema', decay=decay)
    polyak = steps.update_average(polyak, params, t, averaging='polyak', decay=decay)
  t = len(iterates) - 1
  closed_ema = decay**t * iterates[0] + sum(
      (1 - decay) * decay**(t - i) * iterates[i] for i in range(1, t + 1))
  np.testing.assert_allclose(ema, closed_ema, rtol=1e-6)
  np.testing.assert_allclose(polyak, np.mean(iterates[1:], axis=0), rtol=1e-6)


@pytest.mark.parametrize('averaging', ['ema', 'polyak'])
def test_train_step_keeps_the_closed_form_average_of_its_iterates(averaging):
  config = _config(averaging=averaging, ema_decay=0.8)
  state, step, mesh = _build(config)
  batch = _batch(8, mesh)
  trajectory = [_copy(state.params)]
  for _ in range(3):
    state, _ = step(state, batch)
    trajectory.append(_copy(state.params))
  want = trajectory[0]
  for t in range(1, 4):
    weight = 0.2 if averaging == 'ema' else 1 / t
    want = jax.tree.map(lambda a, p, w=weight: a + w * (p - a), want, trajectory[t])
  for got, expected in zip(jax.tree.leaves(state.average), jax.tree.leaves(want)):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  # What is evaluated and released is the average, with any frozen part merged in.
  for got, expected in zip(jax.tree.leaves(state.model_params(averaged=True)),
                           jax.tree.leaves(want)):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_frozen_parameters_are_unchanged_not_differentiated_and_get_no_noise():
  config = _config(trainable='head')
  state, step, mesh = _build(config, noise_multiplier=1.0)
  before = _copy(state.frozen)
  assert set(state.params) == {'fc'} and 'fc' not in state.frozen
  batch = _batch(8, mesh)
  new_state, _ = step(state, batch)
  for got, want in zip(jax.tree.leaves(new_state.frozen), jax.tree.leaves(before)):
    np.testing.assert_array_equal(got, want)
  assert not np.allclose(new_state.params['fc']['kernel'], 0)
  # The optimizer (noise, momentum) works on the head only.
  momentum_state, momentum_step, _ = _build(_config(trainable='head', momentum=0.9))
  momentum_state, _ = momentum_step(momentum_state, batch)
  head_shapes = {x.shape for x in jax.tree.leaves(momentum_state.params)}
  optimizer_shapes = {x.shape for x in jax.tree.leaves(momentum_state.opt_state) if x.ndim}
  assert optimizer_shapes == head_shapes, optimizer_shapes
  # Not differentiated: the compiled head-only step does a fraction of the full step's work.
  full_state, full_step, _ = _build(_config(trainable='all'))
  flops = {}
  for name, (s, fn) in {'head': (new_state, step), 'all': (full_state, full_step)}.items():
    flops[name] = fn.lower(s, batch).compile().cost_analysis()['flops']
  assert flops['head'] < 0.6 * flops['all'], flops


@pytest.mark.parametrize('augmult', [1, 3])
def test_virtual_batch_chunks_give_the_same_step(augmult):
  # A logical batch processed in chunks (the preprocessing too) takes the same step as in one
  # piece: a virtual batch, one noise draw.
  results = []
  for microbatch in (4, 8):
    config = _config(microbatch_size=microbatch, augmult=augmult)
    state, step, mesh = _build(config, noise_multiplier=0.5)
    state, _ = step(state, _batch(8, mesh))
    results.append(_copy(state.params))
  for got, want in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-7)


def test_a_large_logical_batch_needs_memory_for_one_chunk_only():
  sizes = {}
  for rows in (16, 128):
    config = _config(batch_size=rows, microbatch_size=8, augmult=2)
    state, step, mesh = _build(config)
    compiled = step.lower(state, _batch(rows, mesh)).compile()
    sizes[rows] = compiled.memory_analysis().temp_size_in_bytes
  # 8x the examples, not 8x the working memory: the float images and activations of one
  # chunk at a time (the uint8 inputs are arguments, not temporaries).
  assert sizes[128] < 2 * sizes[16], sizes


def test_augmentation_views_are_consecutive_and_keyed_per_example():
  batch = {'images': jnp.zeros((3, 2, 2, 1), jnp.uint8), 'labels': jnp.arange(3),
           'ids': jnp.arange(3), 'stable_ids': jnp.array([11, 22, 33], jnp.uint32),
           'mask': jnp.array([True, True, False])}
  rows = steps.augmentation_views(batch, 2)
  np.testing.assert_array_equal(rows['labels'], [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(rows['mask'], [True, True, True, True, False, False])
  np.testing.assert_array_equal(rows['aug_ids'], [22, 23, 44, 45, 66, 67])
  single = steps.augmentation_views(batch, 1)
  np.testing.assert_array_equal(single['aug_ids'], batch['stable_ids'])


def test_modern_recipe_at_the_demo_size_keeps_its_techniques():
  # On demo data the modern recipe changes size and step only (README "Recipes"); momentum and
  # EMA stay, and real data keeps the literature's values.
  real = default.preset(recipe='modern', demo_data=False)
  demo = default.preset(recipe='modern', demo_data=True)
  assert (real.batch_size, real.l2_norm_clip, real.learning_rate, real.augmult) == (256, 0.1, 0.5, 4)
  assert (demo.batch_size, demo.l2_norm_clip, demo.learning_rate, demo.augmult) == (64, 1.0, 0.5, 1)
  for config in (real, demo):
    assert (config.recipe, config.momentum, config.averaging, config.ema_decay) == (
        'modern', 0.9, 'ema', 0.9)
  paper_demo = default.preset(recipe='paper', demo_data=True)
  assert (paper_demo.batch_size, paper_demo.learning_rate, paper_demo.momentum) == (64, 0.01, 0.0)


def test_scatternet_preset_applies_to_run_and_flags_still_win():
  from experiments import run
  config = run.make_config(['--arch=scatternet'])
  assert (config.batch_size, config.learning_rate, config.weights, config.augment) == (
      256, 0.1, 'none', False)
  assert run.make_config(['--arch=scatternet_cnn', '--batch_size=128']).batch_size == 128
  assert run.make_config([]).arch == 'resnet18' and run.make_config([]).batch_size == 64


def test_scatternet_non_private_preset_takes_more_steps():
  """Without noise the ScatterNets train at batch 64 (chosen on validation); DP-SGD keeps 256."""
  from experiments import run
  for arch in default.SCATTERNET_ARCHS:
    assert default.preset(arch=arch, mech='none').batch_size == 64
    assert default.preset(arch=arch, mech='dpsgd').batch_size == 256
    assert default.preset(arch=arch, mech='ldp').batch_size == 256
    assert run.make_config([f'--arch={arch}', '--mech=none']).batch_size == 64
    assert run.make_config([f'--arch={arch}', '--mech=none', '--batch_size=32']).batch_size == 32
  assert default.preset(arch='resnet18', mech='none').batch_size == default.preset().batch_size


def test_a_step_count_beyond_the_noise_counter_is_refused():
  """The optimiser's int32 count saturates at 2**31 - 1: later steps would reuse noise keys."""
  import pytest
  from experiments import privacy_plan
  from experiments import run
  from experiments.config_checks import ConfigError
  config = run.make_config(['--mech=dpsgd', '--accountant=rdp', '--epochs=2000000000'])
  with pytest.raises(ConfigError, match='--epochs'):
    privacy_plan.plan_privacy(config, num_units=640, privacy_unit='image')
