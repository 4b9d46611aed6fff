"""Tests for dpjax.models.resnet. Numerical equivalence with torchvision is in weights_test."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import models
from dpjax.models import resnet

# torchvision.models.resnet18(): sum(p.numel() for p in model.parameters()).
TORCHVISION_RESNET18_NUM_PARAMS = 11_689_512
# Running mean + variance of every BatchNorm2d: 2 * (64 + 4*64 + (4+1)*128 + (4+1)*256 + (4+1)*512).
TORCHVISION_RESNET18_NUM_BN_STATS = 9_600


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _images(seed, shape=(3, 32, 32, 3)):
  return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _numpy_variables(model, seed):
  """Random variables of `model`'s shapes, made by NumPy: no JAX random-number compile.

  Running means/variances are far from their init (0, 1) so that normalising with batch
  statistics instead of running ones shows.
  """
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    return (0.5 * rng.standard_normal(leaf.shape)).astype(np.float32)  # bias, mean

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _apply(model, variables, x, train, mutable=False):
  # Jitted: un-jitted Flax runs op by op, and compiling each op is slow on CPU.
  mutable = list(mutable) if mutable else False
  apply = jax.jit(lambda v, images: model.apply(v, images, train=train, mutable=mutable))
  return apply(variables, x)


@functools.cache
def _tiny_variables(norm):
  model = models.ResNetTiny(num_classes=5, norm=norm)
  return model, _numpy_variables(model, seed=1)


@pytest.mark.parametrize('norm', models.NORMS)
def test_resnet18_has_torchvision_parameter_and_statistic_counts(norm):
  model = models.ResNet18(num_classes=1000, norm=norm)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((2, 64, 64, 3)), train=False))
  assert _count(shapes['params']) == TORCHVISION_RESNET18_NUM_PARAMS
  if norm == 'group_norm':
    assert set(shapes) == {'params'}
  else:
    assert set(shapes) == {'params', 'batch_stats'}
    assert _count(shapes['batch_stats']) == TORCHVISION_RESNET18_NUM_BN_STATS
  logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 64, 64, 3)), train=False), shapes)
  assert logits.shape == (2, 1000)
  # Layer layout and names mirror torchvision (layer2.0.downsample.0 -> layer2_0/downsample_conv).
  assert shapes['params']['conv1']['kernel'].shape == (7, 7, 3, 64)
  assert shapes['params']['layer2_0']['downsample_conv']['kernel'].shape == (1, 1, 64, 128)
  assert 'downsample_conv' not in shapes['params']['layer1_0']
  assert shapes['params']['layer4_1']['conv2']['kernel'].shape == (3, 3, 512, 512)
  assert shapes['params']['fc']['kernel'].shape == (512, 1000)


def test_frozen_bn_uses_running_statistics_and_never_updates_them_in_training():
  model, variables = _tiny_variables('frozen_bn')
  x = _images(2)
  train_logits, updates = _apply(model, variables, x, train=True, mutable=('batch_stats',))
  eval_logits = _apply(model, variables, x, train=False)
  np.testing.assert_array_equal(np.asarray(train_logits), np.asarray(eval_logits))
  # The collection comes back (so a trainer can store it) with every value unchanged.
  assert jax.tree.structure(updates['batch_stats']) == jax.tree.structure(variables['batch_stats'])
  for before, after in zip(jax.tree.leaves(variables['batch_stats']),
                           jax.tree.leaves(updates['batch_stats'])):
    np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
  # Also callable without mutable, as a DP train step under vmap does.
  plain_logits = _apply(model, variables, x, train=True)
  np.testing.assert_array_equal(np.asarray(plain_logits), np.asarray(eval_logits))


def _torch_padded_stem_conv(kernel, x):
  # torch Conv2d(3, C, 7, stride=2, padding=3): three zeros on every side.
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(2, 2), padding=((3, 3), (3, 3)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=jax.lax.Precision.HIGHEST)


def test_batch_norm_updates_running_stats_like_torch_momentum_and_stem_padding():
  model, variables = _tiny_variables('batch_norm')
  x = _images(3)
  _, updates = _apply(model, variables, x, train=True, mutable=('batch_stats',))
  stem_out = _torch_padded_stem_conv(variables['params']['conv1']['kernel'], x)
  batch_mean = jnp.mean(stem_out, axis=(0, 1, 2))
  batch_var = jnp.var(stem_out, axis=(0, 1, 2))
  old = variables['batch_stats']['bn1']
  # torch: running = (1 - 0.1) * running + 0.1 * batch statistic.
  np.testing.assert_allclose(updates['batch_stats']['bn1']['mean'],
                             0.9 * old['mean'] + 0.1 * batch_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates['batch_stats']['bn1']['var'],
                             0.9 * old['var'] + 0.1 * batch_var, rtol=1e-4, atol=1e-6)


def test_batch_norm_eval_equals_frozen_bn():
  frozen_model, variables = _tiny_variables('frozen_bn')
  bn_model = models.ResNetTiny(num_classes=5, norm='batch_norm')
  x = _images(4)
  np.testing.assert_array_equal(np.asarray(_apply(bn_model, variables, x, train=False)),
                                np.asarray(_apply(frozen_model, variables, x, train=False)))


@pytest.mark.parametrize('norm, independent', [('frozen_bn', True), ('group_norm', True),
                                               ('batch_norm', False)])
def test_examples_are_independent_in_training_exactly_for_dp_safe_norms(norm, independent):
  model, variables = _tiny_variables(norm)
  x = _images(5)
  x_changed = x.copy()
  x_changed[2] = 10.0 * _images(6, (32, 32, 3))
  apply = jax.jit(lambda v, images: model.apply(v, images, train=True, mutable=['batch_stats'])[0])
  others_before, others_after = apply(variables, x)[:2], apply(variables, x_changed)[:2]
  change = float(jnp.max(jnp.abs(others_before - others_after)))
  if independent:
    assert change < 1e-5
  else:
    assert change > 1e-2
  assert models.is_dp_safe(norm) == independent


def test_group_norm_has_no_batch_stats_and_uses_32_groups_at_most():
  model, variables = _tiny_variables('group_norm')
  assert set(variables) == {'params'}
  assert set(variables['params']['bn1']) == {'scale', 'bias'}
  _, updates = _apply(model, variables, _images(7), train=True, mutable=('batch_stats',))
  assert not updates
  assert resnet._norm_layer('group_norm', True, 512, 'norm', jnp.float32).num_groups == 32
  assert resnet._norm_layer('group_norm', True, 8, 'norm', jnp.float32).num_groups == 8


def test_dp_safety_is_exposed_and_unknown_names_fail():
  assert models.DP_SAFE_NORMS == {'frozen_bn', 'group_norm'}
  assert not models.is_dp_safe('batch_norm')
  with pytest.raises(ValueError, match="norm='layer_norm'"):
    models.is_dp_safe('layer_norm')
  with pytest.raises(ValueError, match="arch='resnet50'"):
    models.create_model(10, arch='resnet50')
  with pytest.raises(ValueError, match="norm='bn'"):
    models.create_model(10, norm='bn')


def test_create_model():
  model = models.create_model(num_classes=2, norm='group_norm', arch='tiny')
  assert (model.num_classes, model.norm, tuple(model.stage_sizes), model.num_filters) == (
      2, 'group_norm', (1, 1), 8)
  model = models.create_model(num_classes=5)
  assert (model.num_classes, model.norm, tuple(model.stage_sizes)) == (5, 'frozen_bn', (2, 2, 2, 2))


def test_resnet8_is_small_and_its_last_stage_is_the_64_channel_block():
  # The DP-from-scratch network: 79k parameters (ResNet-18: 11.2M), so the noise a DP-SGD
  # step adds to the weights is about 12x smaller in norm at the same noise multiplier.
  model = models.create_model(num_classes=2, norm='group_norm', arch='resnet8')
  params = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)['params']
  assert sum(x.size for x in jax.tree.leaves(params)) == 79442
  assert set(models.trainable_modules(params, 'last_stage')) == {'layer3_0', 'fc'}
  assert params['layer3_0']['conv2']['kernel'].shape == (3, 3, 64, 64)
