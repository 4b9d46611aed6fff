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

    def per_example(xb, gb):
      _, vjp = jax.vjp(lambda p: module.apply({'params': p}, xb[None]), variables['params'])
      return jnp.sum(jnp.square(vjp(gb[None])[0]['kernel']))

    np.testing.assert_allclose(ghost_clipping._conv_squared_norms(module, x, g),
                               jax.vmap(per_example)(x, g), rtol=1e-4)


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
