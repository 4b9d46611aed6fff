"""Tests for dpjax.models.scatternet: the transform, the model and DP-SGD's requirements."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax import clipping
from dpjax import ghost_clipping
from dpjax import models
from dpjax.data import preprocess
from dpjax.models import resnet
from dpjax.models import scatternet

ARCHS = ('scatternet', 'scatternet_cnn')
FEATURE_NORMS = (scatternet.GROUP_NORM, scatternet.DATA_NORM)


def _pixels(seed, shape, grey=False):
  """[0, 1] NHWC RGB pixels; three equal channels when `grey` (as chest X-rays are stored)."""
  rng = np.random.default_rng(seed)
  if grey:
    return np.repeat(rng.uniform(size=shape[:-1] + (1,)), 3, axis=-1).astype(np.float32)
  return rng.uniform(size=shape).astype(np.float32)


def _inputs(seed, shape=(4, 16, 16, 3), grey=False):
  """What every dpjax model gets: ImageNet-normalised images."""
  return np.asarray(preprocess.normalize(_pixels(seed, shape, grey)))


def _init(model, x):
  return jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x[:1])


def _numpy_variables(model, image_shape, seed):
  """Random variables of `model`'s shapes, made by NumPy: no init to compile (or to run op by
  op, which is slow for the scattering). Heads are random too, not zero."""
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))
      return rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)
    if name in ('scale', 'feature_var', 'var'):
      return rng.uniform(0.5, 2.0, leaf.shape)
    if name in ('mean', 'feature_mean'):
      return np.zeros(leaf.shape)
    return 0.1 * rng.standard_normal(leaf.shape)  # bias

  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: fill(path, leaf).astype(leaf.dtype), shapes)


def _apply(model, variables, x, train=True, **kwargs):
  return jax.jit(lambda v, x: model.apply(v, x, train=train, **kwargs))(variables, x)


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


# --- the transform -------------------------------------------------------------------------


@pytest.mark.parametrize('J, L', [(2, 8), (1, 4)])
def test_scattering_matches_kymatio_numpy_reference(J, L):
  from kymatio.scattering2d.frontend.numpy_frontend import ScatteringNumPy2D

  images = _pixels(0, (2, 16, 24, 3))  # Not square: rows and columns kept apart.
  got = np.asarray(jax.jit(lambda x: scatternet.scattering(x, J, L))(images))
  channels = scatternet.num_scattering_channels(J, L)
  assert got.shape == (2, 16 // 2**J, 24 // 2**J, 3 * channels)
  assert got.dtype == np.float32
  reference = ScatteringNumPy2D(J=J, shape=(16, 24), L=L)(
      np.transpose(images, (0, 3, 1, 2)).astype(np.float64))  # [B, C, K, H', W']
  want = reference.reshape(2, 3 * channels, *got.shape[1:3]).transpose(0, 2, 3, 1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.max(np.abs(want)))


def test_scattering_is_float32_and_has_no_gradient():
  images = _pixels(1, (2, 16, 16, 1)).astype(np.float64)
  with jax.enable_x64(True):
    features = scatternet.scattering(jnp.asarray(images), 2, 8)
    grad = jax.grad(lambda x: jnp.sum(scatternet.scattering(x, 2, 8) ** 2))(jnp.asarray(images))
  assert features.dtype == jnp.float32 and features.shape == (2, 4, 4, 81)
  assert not np.any(np.asarray(grad))


def test_transform_is_cached_and_kymatio_imported_lazily():
  assert scatternet._transform(2, 8, (16, 16)) is scatternet._transform(2, 8, (16, 16))
  code = ('import sys, dpjax, dpjax.models, dpjax.ghost_clipping; '
          'm = dpjax.models.create_model(2, "group_norm", arch="scatternet"); '
          'assert "kymatio" not in sys.modules, "kymatio imported"')
  subprocess.run([sys.executable, '-c', code], check=True, timeout=120)


# --- the model -----------------------------------------------------------------------------


def test_grey_path_scatters_the_grey_image_once():
  pixels = _pixels(2, (3, 16, 16, 3), grey=True)
  model = models.create_model(2, 'group_norm', arch='scatternet', grayscale=True)
  got = scatternet.scattering_features(model, preprocess.normalize(pixels))
  want = scatternet.scattering(pixels[..., :1], 2, 8)
  assert got.shape == want.shape == (3, 4, 4, 81)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(want)))


def test_colour_path_scatters_each_channel():
  pixels = _pixels(3, (3, 16, 16, 3))
  model = models.create_model(2, 'group_norm', arch='scatternet')
  got = scatternet.scattering_features(model, preprocess.normalize(pixels))
  want = scatternet.scattering(pixels, 2, 8)
  assert got.shape == (3, 4, 4, 243) and model.num_feature_channels == 243
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(want)))


@pytest.mark.parametrize('feature_norm', FEATURE_NORMS)
@pytest.mark.parametrize('arch', ARCHS)
def test_forward_shapes(arch, feature_norm):
  x = _inputs(4, (3, 16, 16, 3), grey=True)
  model = models.create_model(5, 'group_norm', arch=arch, grayscale=True).clone(
      feature_norm=feature_norm)
  variables = _init(model, x)
  logits = _apply(model, variables, x)
  assert logits.shape == (3, 5) and bool(jnp.all(jnp.isfinite(logits)))
  expected = {'fc'} if arch == 'scatternet' else {'layer1_0', 'layer2_0', 'fc'}
  assert set(variables['params']) == expected
  if feature_norm == scatternet.DATA_NORM:
    stats = variables['batch_stats']
    np.testing.assert_array_equal(stats['feature_mean'], np.zeros(81))
    np.testing.assert_array_equal(stats['feature_var'], np.ones(81))
  else:
    assert 'batch_stats' not in variables


@pytest.mark.parametrize('arch, grayscale, norm, num_params', [
    ('scatternet', True, 'group_norm', 4 * 4 * 81 * 3 + 3),
    ('scatternet', False, 'frozen_bn', 4 * 4 * 243 * 3 + 3),  # `norm` is ignored.
    ('scatternet_cnn', True, 'group_norm', 9 * 81 * 32 + 9 * 32 * 32 + 4 * 32 + 32 * 3 + 3),
    ('scatternet_cnn', False, 'frozen_bn', 9 * 243 * 32 + 9 * 32 * 32 + 4 * 32 + 32 * 3 + 3),
])
def test_parameter_counts(arch, grayscale, norm, num_params):
  model = models.create_model(3, norm, arch=arch, grayscale=grayscale)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
  assert _count(shapes['params']) == num_params
  assert ('batch_stats' in shapes) == (arch == 'scatternet_cnn' and norm == 'frozen_bn')


def test_bad_configurations_raise():
  x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  init = lambda model: jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x)
  with pytest.raises(ValueError, match='feature_groups'):
    init(scatternet.ScatterNetLinear(2, feature_groups=10))
  with pytest.raises(ValueError, match='feature_norm'):
    init(scatternet.ScatterNetLinear(2, feature_norm='batch'))
  with pytest.raises(ValueError, match='RGB'):  # Inputs are ImageNet-normalised RGB.
    jax.eval_shape(lambda: scatternet.ScatterNetLinear(2, grayscale=True).init(
        jax.random.key(0), jnp.zeros((1, 16, 16, 1)), train=False))
  with pytest.raises(ValueError, match='Unknown'):
    models.create_model(2, 'layer_norm', arch='scatternet')


def test_data_norm_standardises_with_batch_stats_and_never_updates_them():
  x = _inputs(5, (3, 16, 16, 3), grey=True)
  model = scatternet.ScatterNetLinear(4, grayscale=True, feature_norm=scatternet.DATA_NORM)
  variables = _init(model, x)
  rng = np.random.default_rng(6)
  kernel = rng.standard_normal(variables['params']['fc']['kernel'].shape).astype(np.float32)
  bias = rng.standard_normal(4).astype(np.float32)
  mean = rng.uniform(0.0, 0.2, 81).astype(np.float32)
  var = rng.uniform(0.01, 0.1, 81).astype(np.float32)
  var[3] = 0.0  # A private estimate clamped at zero: that channel is dropped.
  stats = {'feature_mean': mean, 'feature_var': var}
  variables = {'params': {'fc': {'kernel': kernel, 'bias': bias}}, 'batch_stats': stats}

  logits, updated = _apply(model, variables, x, train=True, mutable=['batch_stats'])
  jax.tree.map(np.testing.assert_array_equal, updated['batch_stats'], stats)  # Not updated.
  features = np.asarray(scatternet.scattering_features(model, x), np.float64)
  scale = np.where(var > 0, 1 / np.sqrt(var.astype(np.float64) + scatternet.FEATURE_EPSILON), 0)
  want = ((features - mean) * scale).reshape(3, -1) @ kernel + bias
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4 * np.max(np.abs(want)))
  np.testing.assert_allclose(_apply(model, variables, x, train=False), logits, rtol=1e-6)

  # The default statistics (0, 1) leave the features (nearly) as they are: other logits.
  default = {**variables, 'batch_stats': {'feature_mean': np.zeros(81, np.float32),
                                          'feature_var': np.ones(81, np.float32)}}
  plain = features.reshape(3, -1) / np.sqrt(1 + scatternet.FEATURE_EPSILON) @ kernel + bias
  np.testing.assert_allclose(_apply(model, default, x), plain, rtol=1e-4,
                             atol=1e-4 * np.max(np.abs(plain)))
  assert not np.allclose(plain, want)


@pytest.mark.parametrize('arch, feature_norm, grayscale', [
    ('scatternet', scatternet.GROUP_NORM, True),
    ('scatternet', scatternet.DATA_NORM, False),
    ('scatternet_cnn', scatternet.GROUP_NORM, False),
    ('scatternet_cnn', scatternet.DATA_NORM, True),
])
def test_no_example_mixing(arch, feature_norm, grayscale):
  x = _inputs(7, (4, 16, 16, 3), grey=grayscale)
  model = models.create_model(3, 'group_norm', arch=arch, grayscale=grayscale).clone(
      feature_norm=feature_norm)
  variables = _numpy_variables(model, x.shape[1:], seed=8)  # Not the zero head: it hides all.
  other = x.copy()
  other[1] = _inputs(9, (1, 16, 16, 3), grey=grayscale)[0]
  before, after = _apply(model, variables, x), _apply(model, variables, other)
  unchanged = np.arange(4) != 1
  np.testing.assert_allclose(after[unchanged], before[unchanged], rtol=1e-6, atol=1e-6)
  assert np.max(np.abs(after[1] - before[1])) > 1e-3


def test_trainable_modules():
  x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  params = {}
  for arch in ARCHS:
    model = models.create_model(2, 'group_norm', arch=arch, grayscale=True)
    params[arch] = jax.eval_shape(
        lambda x, model=model: model.init(jax.random.key(0), x, train=False), x)['params']
  cnn = params['scatternet_cnn']
  assert set(models.trainable_modules(cnn, 'all')) == {'layer1_0', 'layer2_0', 'fc'}
  assert models.trainable_modules(cnn, 'head') == ('fc',)
  assert set(models.trainable_modules(cnn, 'last_stage')) == {'layer2_0', 'fc'}
  trained, frozen = models.split_params(cnn, 'head')
  assert set(trained) == {'fc'} and set(frozen) == {'layer1_0', 'layer2_0'}
  linear = params['scatternet']
  assert models.trainable_modules(linear, 'all') == ('fc',)
  assert models.trainable_modules(linear, 'head') == ('fc',)
  with pytest.raises(ValueError):  # No stages: resnet.trainable_modules refuses (max() of none).
    models.trainable_modules(linear, 'last_stage')


def test_jit_vmap_grad_per_example_gradients():
  x = _inputs(10, (4, 16, 16, 3))
  labels = np.array([0, 1, 2, 1])
  model = models.create_model(3, 'group_norm', arch='scatternet_cnn')
  params = _numpy_variables(model, x.shape[1:], seed=11)['params']

  def loss(p, image, label):
    logits = model.apply({'params': p}, image[None], train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, label[None])[0]

  per_example = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))(params, x, labels)
  one, image_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x[2], labels[2])
  for got, want in zip(jax.tree.leaves(per_example), jax.tree.leaves(one)):
    assert got.shape == (4,) + want.shape
    # float32, batched or not: sums in another order (and ReLU / max-pool kinks).
    np.testing.assert_allclose(got[2], want, rtol=0, atol=1e-3 * float(np.max(np.abs(want))))
    assert np.all(np.any(np.asarray(got).reshape(4, -1) != 0, axis=1))
  assert not np.any(np.asarray(image_grad))  # The fixed transform passes no gradient back.


# --- DP-SGD: ghost clipping equals the vmap reference ---------------------------------------


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _to_float64(tree):
  return jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), tree)


@pytest.mark.parametrize('arch, feature_norm, grayscale', [
    ('scatternet', scatternet.GROUP_NORM, True),
    ('scatternet', scatternet.DATA_NORM, False),
    ('scatternet_cnn', scatternet.GROUP_NORM, False),
    ('scatternet_cnn', scatternet.DATA_NORM, True),
])
def test_ghost_clipping_matches_vmap(x64, arch, feature_norm, grayscale):
  del x64
  size = 6
  images = _inputs(11, (size, 16, 16, 3), grey=grayscale).astype(np.float64)
  images[4] = np.nan  # A padding row: contributes nothing, even when not finite.
  mask = np.arange(size) != 4
  labels = np.array([0, 1, 2, 0, 1, 2])
  model = models.create_model(3, 'group_norm', arch=arch, grayscale=grayscale).clone(
      feature_norm=feature_norm, dtype=jnp.float64)
  variables = _to_float64(_numpy_variables(model, images.shape[1:], seed=12))
  params = variables['params']
  rest = {k: v for k, v in variables.items() if k != 'params'}
  if feature_norm == scatternet.DATA_NORM:  # Statistics of (public) test images.
    features = jax.jit(lambda x: scatternet.scattering_features(model, x))(images[mask])
    features = np.asarray(features, np.float64)
    features = features.reshape(-1, features.shape[-1])
    rest = {'batch_stats': _to_float64({'feature_mean': features.mean(0),
                                        'feature_var': features.var(0)})}
  batch = {'image': jnp.asarray(images), 'label': jnp.asarray(labels)}

  def batch_loss(p, batch):
    logits = model.apply({'params': p, **rest}, batch['image'], train=True)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    return losses, {'loss': losses}

  def example_loss(p, example):
    logits = model.apply({'params': p, **rest}, example['image'][None], train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, example['label'][None])[0]
    return loss, {'loss': loss}

  mask = jnp.asarray(mask)
  ghost_fn = jax.jit(lambda p, clip: ghost_clipping.ghost_clipped_grad_sum(
      batch_loss, p, batch, mask, clip))
  reference_fn = jax.jit(lambda p, clip: clipping.clipped_grad_sum(
      example_loss, p, batch, mask, clip))
  # Clip at the real examples' mean gradient norm: some are clipped, some not.
  clip = float(reference_fn(params, 1e12)[1].mean_norm)
  ghost, reference = ghost_fn(params, clip), reference_fn(params, clip)

  (g_sum, g_stats, g_aux), (r_sum, r_stats, r_aux) = ghost, reference
  assert jax.tree.structure(g_sum) == jax.tree.structure(r_sum)
  for got, want in zip(jax.tree.leaves(g_sum), jax.tree.leaves(r_sum)):
    assert got.dtype == want.dtype == jnp.float64
    assert bool(jnp.all(jnp.isfinite(got)))
    scale = float(jnp.max(jnp.abs(want)))
    assert scale > 0
    np.testing.assert_allclose(got / scale, want / scale, rtol=0, atol=1e-9)
  assert float(g_stats.num_examples) == float(r_stats.num_examples) == size - 1
  assert float(g_stats.num_clipped) == float(r_stats.num_clipped)
  assert 0 < float(g_stats.num_clipped) < size - 1
  np.testing.assert_allclose(g_stats.sum_norms, r_stats.sum_norms, rtol=1e-9)
  np.testing.assert_allclose(g_aux['loss'][mask], r_aux['loss'][mask], rtol=1e-9)


def test_create_model_routes_and_resnets_ignore_grayscale():
  assert set(ARCHS) <= set(models.ARCHITECTURES)
  linear = models.create_model(2, 'group_norm', arch='scatternet', grayscale=True)
  cnn = models.create_model(2, 'group_norm', arch='scatternet_cnn', dtype=jnp.bfloat16)
  assert isinstance(linear, scatternet.ScatterNet) and linear.head == scatternet.LINEAR
  assert linear.grayscale and not cnn.grayscale
  assert cnn.head == scatternet.CNN and cnn.dtype == jnp.bfloat16
  assert isinstance(models.create_model(2, arch='tiny', grayscale=True), resnet.ResNet)
