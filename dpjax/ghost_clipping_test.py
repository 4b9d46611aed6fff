"""Ghost (book-keeping) clipping equals the vmap reference, exactly what DP-SGD needs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax import clipping
from dpjax import ghost_clipping
from dpjax.models import resnet


def _losses(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _clipped_sum_fns(model, variables, images, labels, clip, microbatch_size=None):
  """Jitted (ghost, vmap reference) functions of the mask, per-example cross-entropy."""
  rest = {k: v for k, v in variables.items() if k != 'params'}
  batch = {'image': images, 'label': labels}

  def batch_loss(p, batch):
    logits = model.apply({'params': p, **rest}, batch['image'], train=True)
    losses = _losses(logits, batch['label'])
    return losses, {'loss': losses}

  def example_loss(p, example):
    logits = model.apply({'params': p, **rest}, example['image'][None], train=True)
    loss = _losses(logits, example['label'][None])[0]
    return loss, {'loss': loss}

  ghost = jax.jit(lambda p, mask: ghost_clipping.ghost_clipped_grad_sum(
      batch_loss, p, batch, mask, clip, microbatch_size))
  reference = jax.jit(lambda p, mask: clipping.clipped_grad_sum(
      example_loss, p, batch, mask, clip, microbatch_size))
  return ghost, reference


def _both(model, variables, images, labels, mask, clip, microbatch_size=None):
  """(ghost result, vmap result)."""
  ghost, reference = _clipped_sum_fns(model, variables, images, labels, clip, microbatch_size)
  mask = jnp.ones(images.shape[0], bool) if mask is None else mask
  return ghost(variables['params'], mask), reference(variables['params'], mask)


def _assert_same(ghost, reference, rtol=2e-5, real=slice(None)):
  (g_sum, g_stats, g_aux), (r_sum, r_stats, r_aux) = ghost, reference
  assert jax.tree.structure(g_sum) == jax.tree.structure(r_sum)
  for got, want in zip(jax.tree.leaves(g_sum), jax.tree.leaves(r_sum)):
    assert bool(jnp.all(jnp.isfinite(got))) and bool(jnp.all(jnp.isfinite(want)))
    scale = float(jnp.max(jnp.abs(want))) + 1e-12
    np.testing.assert_allclose(got / scale, want / scale, atol=rtol)
  np.testing.assert_allclose(g_stats.num_examples, r_stats.num_examples)
  np.testing.assert_allclose(g_stats.num_clipped, r_stats.num_clipped)
  np.testing.assert_allclose(g_stats.sum_norms, r_stats.sum_norms, rtol=rtol)
  np.testing.assert_allclose(g_aux['loss'][real], r_aux['loss'][real], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope='module')
def data():
  key_images, key_labels = jax.random.split(jax.random.key(0))
  images = jax.random.normal(key_images, (8, 32, 32, 3))
  labels = jax.random.randint(key_labels, (8,), 0, 3)
  return images, labels


@pytest.mark.parametrize('norm', [resnet.GROUP_NORM, resnet.FROZEN_BN])
@pytest.mark.parametrize('clip', [0.5, 1e6])  # Every example clipped / none clipped.
def test_resnet_matches_vmap(data, norm, clip):
  images, labels = data
  model = resnet.create_model(3, norm=norm, arch='tiny')
  variables = model.init(jax.random.key(1), images[:1], train=False)
  if norm == resnet.FROZEN_BN:  # Non-trivial running statistics.
    variables = {**variables, 'batch_stats': jax.tree.map(
        lambda x: x + 0.5, variables['batch_stats'])}
  mask = jnp.arange(8) < 6
  ghost, reference = _both(model, variables, images, labels, mask, clip)
  _assert_same(ghost, reference)
  assert float(ghost[1].num_examples) == 6
  assert float(ghost[1].num_clipped) == (6 if clip < 1 else 0)


def test_microbatches_and_nonfinite_padding(data):
  images, labels = data
  # Padded rows full of NaN must contribute exactly zero, as in clipping.clip_and_sum: row 5
  # shares a chunk with a real row, row 7 lies in a chunk of padding only.
  images = images.at[5].set(jnp.nan).at[7].set(jnp.nan)
  mask = jnp.arange(8) < 5
  model = resnet.create_model(3, norm=resnet.GROUP_NORM, arch='tiny')
  variables = model.init(jax.random.key(2), images[:1], train=False)
  ghost, reference = _both(model, variables, images, labels, mask, 1.0, microbatch_size=2)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(ghost[0]))
  _assert_same(ghost, reference)
  whole_fn, _ = _clipped_sum_fns(model, variables, images, labels, 1.0)
  whole = whole_fn(variables['params'], mask)
  _assert_same(ghost, whole, real=mask)  # Skipped padding-only chunks leave aux at zero.


class _SmallMapConv(nn.Module):
  """A strided, biased, SAME-padded conv on a small map: the Gram (ghost) norm path."""

  @nn.compact
  def __call__(self, x, train=True):
    del train
    x = nn.Conv(16, (3, 3), strides=2, padding='SAME')(x)  # T = 4 positions, 144 x 16.
    x = nn.Conv(16, (3,), padding='SAME')(x.reshape(x.shape[0], 4, 16))  # 1-D, int kernel.
    return nn.Dense(3)(nn.relu(x).reshape(x.shape[0], -1))


def test_ghost_norm_path_matches_vmap(data):
  images, labels = data
  x = images[:, :4, :4].repeat(6, axis=-1)[..., :16]
  model = _SmallMapConv()
  variables = model.init(jax.random.key(6), x[:1])
  ghost, reference = _both(model, variables, x, labels, jnp.arange(8) < 7, 0.2)
  _assert_same(ghost, reference)


class _Mixed(nn.Module):
  """Dense on 2-D and 3-D inputs, a biased SAME-padded strided conv, LayerNorm."""

  @nn.compact
  def __call__(self, x, train=True):
    del train
    x = nn.Conv(4, (3, 3), strides=2, padding='SAME')(x)  # Has a bias.
    x = nn.relu(nn.LayerNorm()(x))
    x = nn.Dense(5)(x.reshape(x.shape[0], -1, x.shape[-1]))  # 3-D input: generic path.
    return nn.Dense(3)(jnp.tanh(x).reshape(x.shape[0], -1))


def test_other_layers_match_vmap(data):
  images, labels = data
  model = _Mixed()
  variables = model.init(jax.random.key(3), images[:1, :9, :9])
  ghost, reference = _both(model, variables, images[:, :9, :9], labels, None, 0.3)
  _assert_same(ghost, reference)


def test_conv_norm_paths_agree():
  """The materialised and the ghost (Gram) conv norms give the same value."""
  key_x, key_g = jax.random.split(jax.random.key(4))
  for size, channels, out in [(8, 2, 3), (2, 64, 64)]:  # Materialised, then ghost.
    module = nn.Conv(out, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)
    x = jax.random.normal(key_x, (3, size, size, channels))
    g = jax.random.normal(key_g, (3, size, size, out))
    variables = module.init(jax.random.key(0), x)

    def per_example(xb, gb, module=module, variables=variables):
      _, vjp = jax.vjp(lambda p: module.apply({'params': p}, xb[None]), variables['params'])
      return jnp.sum(jnp.square(vjp(gb[None])[0]['kernel']))

    np.testing.assert_allclose(ghost_clipping._conv_squared_norms(module, x, g),
                               jax.vmap(lambda xb, gb: per_example(xb, gb))(x, g), rtol=1e-4)


class _Shared(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    dense = nn.Dense(3)
    return dense(x) + dense(x)


class _Outside(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    scale = self.param('scale', nn.initializers.ones, (3,))
    return nn.Dense(3)(x) * scale


class _TrainBatchNorm(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    return nn.BatchNorm(use_running_average=not train)(nn.Dense(3)(x))


class _Tied(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    embed = nn.Embed(3, 2)
    return embed.attend(nn.Dense(2)(x))


class _ParameterFreeBatchNorm(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    x = nn.BatchNorm(use_running_average=not train, use_scale=False, use_bias=False)(x)
    return nn.Dense(3)(x)


@pytest.mark.parametrize('model,message', [
    (_Shared(), 'two layer calls'),
    (_Tied(), 'used by its method attend'),
    (_ParameterFreeBatchNorm(), 'batch statistics'),
    (_Outside(), 'child modules with parameters'),
    (_TrainBatchNorm(), 'batch statistics'),
])
def test_unsupported_models_are_refused(model, message):
  x = jnp.ones((4, 2))
  variables = model.init(jax.random.key(0), x)
  rest = {k: v for k, v in variables.items() if k != 'params'}

  def batch_loss(p, batch):
    if rest:
      out, _ = model.apply({'params': p, **rest}, batch, mutable=list(rest))
    else:
      out = model.apply({'params': p}, batch)
    return jnp.sum(out, axis=1), {}

  with pytest.raises(ValueError, match=message):
    ghost_clipping.ghost_clipped_grad_sum(batch_loss, variables['params'], x, None, 1.0)


def test_parameter_used_outside_layers_is_refused():
  model = nn.Dense(3)
  variables = model.init(jax.random.key(0), jnp.ones((1, 2)))
  extra = {'w': jnp.ones((3,))}

  def batch_loss(p, batch):
    return jnp.sum(model.apply({'params': p['dense']}, batch) * p['extra']['w'], axis=1), {}

  with pytest.raises(ValueError, match='outside a supported layer'):
    ghost_clipping.ghost_clipped_grad_sum(
        batch_loss, {'dense': variables['params'], 'extra': extra}, jnp.ones((4, 2)), None, 1.0)


def test_loss_must_be_per_example():
  model = nn.Dense(3)
  variables = model.init(jax.random.key(0), jnp.ones((1, 2)))
  with pytest.raises(ValueError, match='one loss per example'):
    ghost_clipping.ghost_clipped_grad_sum(
        lambda p, b: (jnp.sum(model.apply({'params': p}, b)), {}), variables['params'],
        jnp.ones((4, 2)), None, 1.0)


def test_sensitivity_is_at_most_clip_norm(data):
  """Removing one example moves the clipped sum by at most C (add/remove neighbours)."""
  images, labels = data
  model = resnet.create_model(3, norm=resnet.GROUP_NORM, arch='tiny')
  variables = model.init(jax.random.key(5), images[:1], train=False)
  clip = 0.7
  ghost, _ = _clipped_sum_fns(model, variables, images, labels, clip)
  full, _, _ = ghost(variables['params'], jnp.ones(8, bool))
  for removed in range(3):
    fewer, _, _ = ghost(variables['params'], jnp.arange(8) != removed)
    diff = jnp.sqrt(sum(jnp.sum(jnp.square(a - b)) for a, b in
                        zip(jax.tree.leaves(full), jax.tree.leaves(fewer))))
    assert 0 < float(diff) <= clip * (1 + 1e-5)


# ---------------------------------------------------------------------------------------------
# Units of several rows (group_size > 1): e.g. one patient's images, clipped together.
#
# Implementations are compared in float64: in float32, per-example gradients through ReLU and
# max-pool can differ by ~1e-2 between two exact implementations (a kink flips), which would
# hide real errors behind loose tolerances.


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _to_float64(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating)
                      else x, tree)


def _unit_fns(apply, group_size, microbatch_size=None):
  """Jitted (ghost, vmap reference) of (params, images, labels, mask, clip) for units.

  The reference is the definition: vmap over units of ``jax.grad`` of the sum of the unit's
  real rows' losses, then ``clip_and_sum`` over units, a unit being real iff a row is.
  """

  def batch_loss(p, batch):
    losses = _losses(apply(p, batch['image']), batch['label'])
    return losses, {'loss': losses}

  def ghost(params, images, labels, mask, clip):
    return ghost_clipping.ghost_clipped_grad_sum(
        batch_loss, params, {'image': images, 'label': labels}, mask, clip, microbatch_size,
        group_size=group_size)

  def reference(params, images, labels, mask, clip):
    row = mask.reshape((-1,) + (1,) * (images.ndim - 1))
    clean = jnp.where(row, images, 0.0)  # Padding pixels may be NaN; they are no one's data.
    to_units = lambda x: x.reshape((-1, group_size) + x.shape[1:])
    units = {'image': to_units(clean), 'label': to_units(labels), 'mask': to_units(mask)}

    def unit_loss(p, unit):
      losses = _losses(apply(p, unit['image']), unit['label'])
      return jnp.sum(jnp.where(unit['mask'], losses, 0.0)), losses

    grads, losses = jax.vmap(jax.grad(unit_loss, has_aux=True), in_axes=(None, 0))(
        params, units)
    grad_sum, stats = clipping.clip_and_sum(grads, clip, jnp.any(units['mask'], axis=1))
    return grad_sum, stats, {'loss': losses.reshape(-1)}

  return jax.jit(ghost), jax.jit(reference)


def _assert_same_float64(got, want, mask):
  (g_sum, g_stats, g_aux), (r_sum, r_stats, r_aux) = got, want
  assert jax.tree.structure(g_sum) == jax.tree.structure(r_sum)
  for a, b in zip(jax.tree.leaves(g_sum), jax.tree.leaves(r_sum)):
    assert a.dtype == b.dtype == jnp.float64
    assert bool(jnp.all(jnp.isfinite(a))) and bool(jnp.all(jnp.isfinite(b)))
    scale = float(jnp.max(jnp.abs(b)))
    assert scale > 0
    np.testing.assert_allclose(a / scale, b / scale, rtol=0, atol=1e-9)
  assert float(g_stats.num_examples) == float(r_stats.num_examples)
  assert float(g_stats.num_clipped) == float(r_stats.num_clipped)
  np.testing.assert_allclose(g_stats.sum_norms, r_stats.sum_norms, rtol=1e-9)
  assert g_aux['loss'].shape == mask.shape
  np.testing.assert_allclose(g_aux['loss'][mask], r_aux['loss'][mask], rtol=1e-9)


# Row masks of 12 rows: a unit with a padding row (holding NaN pixels), units of padding only.
_UNIT_MASKS = {
    2: np.array([1, 1, 1, 0, 1, 1, 0, 1, 0, 0, 1, 1], bool),  # 6 units: 5 real.
    3: np.array([1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 1, 1], bool),  # 4 units: 3 real.
}


def _real_units(mask, group_size):
  return int(np.sum(np.any(mask.reshape(-1, group_size), axis=1)))


def _poisoned(images, mask):
  """Images with NaN pixels in the first padding row and inf in the last one."""
  padding = np.flatnonzero(~mask)
  return images.at[padding[0]].set(jnp.nan).at[padding[-1]].set(jnp.inf)


@pytest.fixture(scope='module')
def unit_data():
  key_images, key_labels = jax.random.split(jax.random.key(10))
  images = np.asarray(jax.random.normal(key_images, (12, 32, 32, 3)), np.float64)
  labels = np.asarray(jax.random.randint(key_labels, (12,), 0, 3))
  return images, labels


_RESNET_FNS = {}


def _resnet_setup(norm, group_size, microbatch_size=None):
  """float64 tiny ResNet variables and jitted (ghost, reference), built once per config."""
  model = resnet.create_model(3, norm=norm, arch='tiny').clone(dtype=jnp.float64)
  variables = _to_float64(model.init(jax.random.key(11), jnp.zeros((1, 32, 32, 3)),
                                     train=False))
  if norm == resnet.FROZEN_BN:  # Non-trivial running statistics.
    variables = {**variables, 'batch_stats': jax.tree.map(
        lambda x: x + 0.5, variables['batch_stats'])}
  rest = {k: v for k, v in variables.items() if k != 'params'}
  key = (norm, group_size, microbatch_size)
  if key not in _RESNET_FNS:
    apply = lambda p, x: model.apply({'params': p, **rest}, x, train=True)
    _RESNET_FNS[key] = _unit_fns(apply, group_size, microbatch_size)
  return variables['params'], _RESNET_FNS[key]


@pytest.mark.parametrize('norm', [resnet.GROUP_NORM, resnet.FROZEN_BN])
@pytest.mark.parametrize('group_size', [2, 3])
def test_units_match_per_unit_vmap(x64, unit_data, norm, group_size):
  del x64
  images, labels = unit_data
  mask = _UNIT_MASKS[group_size]
  images = _poisoned(jnp.asarray(images), mask)
  params, (ghost, reference) = _resnet_setup(norm, group_size)
  num_units = _real_units(mask, group_size)
  for clip in (0.05, 1e6):  # Every unit clipped / none clipped.
    got = ghost(params, images, labels, mask, clip)
    _assert_same_float64(got, reference(params, images, labels, mask, clip), mask)
    assert float(got[1].num_examples) == num_units
    assert float(got[1].num_clipped) == (num_units if clip < 1 else 0)
    assert float(got[1].sum_norms) > num_units * 0.05


@pytest.mark.parametrize('group_size,microbatch_size,mask', [
    # Chunks of 2 units; the last chunk is padding only, a NaN row shares a chunk with reals.
    (2, 4, np.array([1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0], bool)),
    # One unit per chunk; the second chunk is padding only.
    (3, 3, np.array([1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1], bool)),
])
def test_unit_microbatches_match_per_unit_vmap(x64, unit_data, group_size, microbatch_size,
                                               mask):
  del x64
  images, labels = unit_data
  images = _poisoned(jnp.asarray(images), mask)
  params, (ghost, _) = _resnet_setup(resnet.GROUP_NORM, group_size, microbatch_size)
  _, (_, reference) = _resnet_setup(resnet.GROUP_NORM, group_size)
  got = ghost(params, images, labels, mask, 0.05)
  _assert_same_float64(got, reference(params, images, labels, mask, 0.05), mask)
  assert float(got[1].num_examples) == _real_units(mask, group_size)
  assert float(got[1].num_clipped) == _real_units(mask, group_size)


def _tree_distance(a, b):
  return float(jnp.sqrt(sum(jnp.sum(jnp.square(x - y)) for x, y in
                            zip(jax.tree.leaves(a), jax.tree.leaves(b)))))


def test_unit_sensitivity_is_at_most_clip_norm(data):
  """Adding/removing one whole unit of 3 rows moves the sum by <= C; per-image clipping: 3C."""
  images, labels = data
  # Units 0 and 1: three identical rows each (aligned, individually large gradients); units
  # 2 and 3: three different rows each.
  images = jnp.concatenate([images[:1].repeat(3, 0), images[1:2].repeat(3, 0), images[2:8]])
  labels = jnp.concatenate([labels[:1].repeat(3), labels[1:2].repeat(3), labels[2:8]])
  model = resnet.create_model(3, norm=resnet.GROUP_NORM, arch='tiny')
  variables = model.init(jax.random.key(12), images[:1], train=False)
  apply = lambda p, x: model.apply({'params': p}, x, train=True)
  clip = 0.01
  by_unit, _ = _unit_fns(apply, 3)
  by_image, _ = _unit_fns(apply, 1)
  params, everyone = variables['params'], jnp.ones(12, bool)

  full, stats, _ = by_unit(params, images, labels, everyone, clip)
  assert float(stats.num_examples) == 4 and float(stats.num_clipped) == 4
  for unit in range(4):
    without = jnp.arange(12) // 3 != unit
    fewer, stats, _ = by_unit(params, images, labels, without, clip)
    assert float(stats.num_examples) == 3
    assert 0.99 * clip < _tree_distance(full, fewer) <= clip * (1 + 1e-5)

  # Why units are needed: clipping each image on its own, the three aligned rows of unit 0
  # each contribute C, so removing that patient moves the sum by 3C, not C.
  full, stats, _ = by_image(params, images, labels, everyone, clip)
  assert float(stats.num_clipped) == 12
  fewer, _, _ = by_image(params, images, labels, jnp.arange(12) >= 3, clip)
  np.testing.assert_allclose(_tree_distance(full, fewer), 3 * clip, rtol=1e-3)


def test_group_size_must_divide_batch_and_microbatch():
  model = nn.Dense(3)
  params = model.init(jax.random.key(0), jnp.ones((1, 2)))['params']
  batch_loss = lambda p, b: (jnp.sum(model.apply({'params': p}, b), axis=1), {})
  x = jnp.ones((12, 2))
  with pytest.raises(ValueError, match='batch size 12 must be a multiple of group_size=5'):
    ghost_clipping.ghost_clipped_grad_sum(batch_loss, params, x, None, 1.0, group_size=5)
  with pytest.raises(ValueError, match='microbatch_size=4 must be a multiple of group_size=3'):
    ghost_clipping.ghost_clipped_grad_sum(batch_loss, params, x, None, 1.0, 4, group_size=3)
  with pytest.raises(ValueError, match='group_size=0'):
    ghost_clipping.ghost_clipped_grad_sum(batch_loss, params, x, None, 1.0, group_size=0)


def test_unit_norm_paths_agree(x64):
  """Gram and materialised unit norms equal |sum_b P_b^T G_b|^2 + |sum_b,t G_b|^2."""
  del x64
  rng = np.random.default_rng(13)
  for positions, fan_in, fan_out in [(1, 12, 10), (1, 2, 3), (4, 144, 16), (16, 3, 2)]:
    patches = rng.normal(size=(6, positions, fan_in))
    out_grads = rng.normal(size=(6, positions, fan_out))
    for group_size in (1, 2, 3):
      p = patches.reshape(6 // group_size, -1, fan_in)
      g = out_grads.reshape(6 // group_size, -1, fan_out)
      want = (np.sum(np.square(np.einsum('uti,uto->uio', p, g)), axis=(1, 2))
              + np.sum(np.square(g.sum(1)), axis=1))
      got = ghost_clipping._unit_squared_norms(jnp.asarray(patches), jnp.asarray(out_grads),
                                                True, group_size)
      np.testing.assert_allclose(got, want, rtol=1e-10)


class _DenseOnly(nn.Module):
  """Dense layers only: 2-D inputs (Gram and materialised unit norms) and a 3-D input."""

  @nn.compact
  def __call__(self, x, train=True):
    del train
    x = jnp.tanh(nn.Dense(10)(x))  # g (12 + 10) < 12 * 10: Gram.
    x = nn.Dense(4)(x.reshape(x.shape[0], 2, 5))  # 3-D: generic path.
    x = jnp.tanh(nn.Dense(2)(x.reshape(x.shape[0], -1)))  # Materialised.
    return nn.Dense(3)(x)  # Materialised.


@pytest.mark.parametrize('model,shape,group_size', [
    (_DenseOnly(), (12,), 2),
    (_DenseOnly(), (12,), 3),
    (_SmallMapConv(), (4, 4, 16), 2),  # Conv Gram path on g * T = 8 positions.
    (_Mixed(), (9, 9, 3), 2),  # Biased conv, LayerNorm, Dense on 2-D and 3-D inputs.
])
def test_small_models_with_units_match_per_unit_vmap(x64, model, shape, group_size):
  del x64
  key_x, key_labels = jax.random.split(jax.random.key(14))
  x = jax.random.normal(key_x, (12,) + shape, jnp.float64)
  labels = jax.random.randint(key_labels, (12,), 0, 3)
  mask = _UNIT_MASKS[group_size]
  x = _poisoned(x, mask)
  params = _to_float64(model.init(jax.random.key(15), jnp.zeros((1,) + shape))['params'])
  apply = lambda p, xs: model.apply({'params': p}, xs)
  ghost, reference = _unit_fns(apply, group_size)
  for clip in (0.05, 1e6):
    got = ghost(params, x, labels, mask, clip)
    _assert_same_float64(got, reference(params, x, labels, mask, clip), mask)
    assert float(got[1].num_clipped) == (_real_units(mask, group_size) if clip < 1 else 0)


def test_bfloat16_model_keeps_each_example_within_c():
  # bfloat16 activations and matmuls, float32 parameters: the norms and the book-keeping run
  # in float32 from the same layer inputs and output gradients, so adding or removing one
  # example moves the clipped sum by its clipped gradient: norm <= C up to float32 rounding.
  model = resnet.create_model(3, norm=resnet.GROUP_NORM, arch='tiny', dtype=jnp.bfloat16)
  images = jax.random.normal(jax.random.key(5), (8, 32, 32, 3))
  labels = jnp.arange(8) % 3
  variables = model.init(jax.random.key(1), images[:1], train=False)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables['params']))
  clip = 0.05  # Every example clipped.

  def batch_loss(p, batch):
    logits = model.apply({'params': p}, batch['image'], train=True).astype(jnp.float32)
    losses = _losses(logits, batch['label'])
    return losses, {'loss': losses}

  ghost = jax.jit(lambda mask: ghost_clipping.ghost_clipped_grad_sum(
      batch_loss, variables['params'], {'image': images, 'label': labels}, mask, clip))
  full, stats, _ = ghost(jnp.ones(8, bool))
  assert int(stats.num_clipped) == 8
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(full))
  for removed in range(8):
    without, _, _ = ghost(jnp.arange(8) != removed)
    moved = np.sqrt(sum(np.sum(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
                        for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(without))))
    assert moved <= clip * (1 + 1e-5), (removed, moved)
    assert moved >= clip * (1 - 1e-3)  # It was clipped to exactly C.


@pytest.mark.parametrize('poison', [jnp.nan, jnp.inf])
def test_a_nonfinite_real_example_contributes_zero_like_vmap(data, poison):
  """A REAL row with a NaN or infinite pixel is zeroed and counted by both methods, and the
  others' clipped sum is what it is without that row (the update stays finite)."""
  images, labels = data
  images = images.at[3, 0, 0, 0].set(poison)
  mask = jnp.ones(8, bool)
  model = resnet.create_model(3, norm=resnet.GROUP_NORM, arch='tiny')
  variables = model.init(jax.random.key(2), images[:1], train=False)
  ghost, reference = _both(model, variables, images, labels, mask, 1.0)
  assert float(ghost[1].num_nonfinite) == float(reference[1].num_nonfinite) == 1
  clean, _ = _both(model, variables, images, labels, mask.at[3].set(False), 1.0)
  for got, vmap, want in zip(jax.tree.leaves(ghost[0]), jax.tree.leaves(reference[0]),
                             jax.tree.leaves(clean[0])):
    assert bool(jnp.all(jnp.isfinite(got)))
    scale = float(jnp.max(jnp.abs(want))) + 1e-12
    np.testing.assert_allclose(got / scale, want / scale, atol=2e-5)
    np.testing.assert_allclose(vmap / scale, want / scale, atol=2e-5)


def test_invalid_traced_clip_norm_poisons_the_sum_instead_of_clipping_silently(data):
  images, labels = data
  model = resnet.create_model(3, norm=resnet.GROUP_NORM, arch='tiny')
  variables = model.init(jax.random.key(2), images[:1], train=False)

  def batch_loss(p, batch):
    losses = _losses(model.apply({'params': p}, batch['image'], train=True), batch['label'])
    return losses, {}

  total = jax.jit(lambda clip: ghost_clipping.ghost_clipped_grad_sum(
      batch_loss, variables['params'], {'image': images, 'label': labels}, None, clip)[0])
  assert all(bool(jnp.all(jnp.isnan(x))) for x in jax.tree.leaves(total(-1.0)))
  with pytest.raises(ValueError, match='l2_norm_clip'):
    ghost_clipping.ghost_clipped_grad_sum(batch_loss, variables['params'],
                                          {'image': images, 'label': labels}, None, np.nan)
