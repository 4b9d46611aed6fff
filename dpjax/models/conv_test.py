"""Patches-times-matrix convolution equals lax's, values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.models import conv

NHWC = ('NHWC', 'HWIO', 'NHWC')


def _lax(x, w, strides, padding):
  return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)


@pytest.mark.parametrize('size,kernel,strides,padding', [
    (9, 3, (1, 1), ((1, 1), (1, 1))),
    (9, 3, (2, 2), ((1, 1), (1, 1))),
    (11, 7, (2, 2), ((3, 3), (3, 3))),
    (7, 1, (2, 2), ((0, 0), (0, 0))),
    (8, 3, (2, 1), 'SAME'),
    (8, 3, (1, 2), 'VALID'),
    (2, 3, (1, 1), ((1, 1), (1, 1))),  # ResNet-18's last stage at 64 px.
    (5, 2, (1, 1), ((0, 1), (1, 0))),  # Asymmetric padding, even kernel.
])
def test_conv_by_patches_matches_lax(size, kernel, strides, padding):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (3, size, size + 1, 5))
  w = jax.random.normal(kw, (kernel, kernel, 5, 4))
  np.testing.assert_allclose(conv.conv_by_patches(x, w, strides, padding),
                             _lax(x, w, strides, padding), rtol=1e-5, atol=1e-5)

  def loss(fn):
    return lambda x, w: jnp.sum(jnp.sin(fn(x, w, strides, padding)))

  got = jax.grad(loss(conv.conv_by_patches), argnums=(0, 1))(x, w)
  want = jax.grad(loss(_lax), argnums=(0, 1))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_patches_order_is_kh_kw_c():
  x = jnp.arange(2 * 3 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 3, 2)
  patches = conv.extract_patches(x, (3, 3), (1, 1), 'VALID')
  assert patches.shape == (2, 1, 1, 18)
  np.testing.assert_array_equal(patches[:, 0, 0], x.reshape(2, 18))


def test_dispatch_only_takes_plain_nhwc():
  x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
  assert conv.is_plain_nhwc(x, w, (1, 1), (1, 1), jax.lax.ConvDimensionNumbers(*conv._NHWC_SPECS))
  assert conv.is_plain_nhwc(x, w, dimension_numbers=NHWC)
  assert not conv.is_plain_nhwc(x, w, rhs_dilation=(2, 2), dimension_numbers=NHWC)
  assert not conv.is_plain_nhwc(x, jnp.ones((3, 3, 1, 2)), dimension_numbers=NHWC,
                                feature_group_count=2)
  assert not conv.is_plain_nhwc(x, w, dimension_numbers=('NCHW', 'OIHW', 'NCHW'))


@pytest.mark.parametrize('kwargs', [
    {'strides': 2, 'padding': 'SAME'},
    {'strides': 1, 'padding': ((1, 1), (1, 1))},
    {'strides': 1, 'padding': 'SAME', 'kernel_dilation': 2},  # Falls back to lax.
    {'strides': 1, 'padding': 'SAME', 'feature_group_count': 2},  # Falls back to lax.
])
def test_flax_conv_hook_matches_default(kwargs):
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 4))
  plain = nn.Conv(6, (3, 3), **kwargs)
  hooked = nn.Conv(6, (3, 3), conv_general_dilated=conv.conv_general_dilated, **kwargs)
  variables = plain.init(jax.random.key(2), x)
  np.testing.assert_allclose(hooked.apply(variables, x), plain.apply(variables, x),
                             rtol=1e-5, atol=1e-5)


def test_feature_major_patches_are_the_patches_transposed():
  x = jax.random.normal(jax.random.key(3), (2, 9, 8, 3))
  for kernel, strides, padding in [((7, 7), (2, 2), ((3, 3), (3, 3))), ((3, 3), (1, 1), 'SAME'),
                                   ((1, 1), (2, 2), 'VALID')]:
    patches = conv.extract_patches(x, kernel, strides, padding)
    np.testing.assert_array_equal(
        conv.extract_patches_feature_major(x, kernel, strides, padding),
        patches.reshape(-1, patches.shape[-1]).T)


_ALL_PLANS = [
    conv.ConvPlan(conv.LAX, conv.LAX, conv.PATCHES),
    conv.ConvPlan(conv.LAX, conv.PATCHES, conv.FEATURE_MAJOR_PATCHES),
    conv.ConvPlan(conv.PATCHES, conv.LAX, conv.LAX),
    conv.ConvPlan(conv.PATCHES, conv.PATCHES, conv.FEATURE_MAJOR_PATCHES),
]


@pytest.mark.parametrize('plan', _ALL_PLANS, ids=str)
@pytest.mark.parametrize('size,kernel,strides,padding', [
    (9, 3, (1, 1), ((1, 1), (1, 1))),
    (11, 7, (2, 2), ((3, 3), (3, 3))),  # The stem.
    (9, 3, (2, 2), ((1, 1), (1, 1))),
    (7, 1, (2, 2), ((0, 0), (0, 0))),  # Downsample shortcut.
    (2, 3, (1, 1), ((1, 1), (1, 1))),
])
def test_every_plan_matches_lax_values_and_gradients(plan, size, kernel, strides, padding):
  kx, kw, kt = jax.random.split(jax.random.key(4), 3)
  x = jax.random.normal(kx, (3, size, size + 1, 5))
  w = jax.random.normal(kw, (kernel, kernel, 5, 4))

  def planned(x, w):
    return conv._planned_conv(x, w, strides, padding, None, None, plan)

  np.testing.assert_allclose(planned(x, w), _lax(x, w, strides, padding), rtol=1e-5, atol=1e-5)

  def loss(fn):
    return lambda x, w: jnp.sum(jnp.sin(fn(x, w)))

  lax_conv = lambda x, w: _lax(x, w, strides, padding)
  for argnums in ((0, 1), 1, 0):  # Both, the kernel alone (ghost clipping), the input alone.
    got = jax.grad(loss(planned), argnums=argnums)(x, w)
    want = jax.grad(loss(lax_conv), argnums=argnums)(x, w)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
  # Forward mode and vmap (per-example gradients) go through the same rule.
  tangents = (jax.random.normal(kt, x.shape), w)
  np.testing.assert_allclose(jax.jvp(planned, (x, w), tangents)[1],
                             jax.jvp(lax_conv, (x, w), tangents)[1], rtol=1e-4, atol=1e-4)
  per_example = jax.vmap(jax.grad(lambda x, w: loss(planned)(x[None], w), argnums=1),
                         in_axes=(0, None))(x, w)
  per_example_lax = jax.vmap(jax.grad(lambda x, w: loss(lax_conv)(x[None], w), argnums=1),
                             in_axes=(0, None))(x, w)
  np.testing.assert_allclose(per_example, per_example_lax, rtol=1e-4, atol=1e-4)


def _plan(size, kernel, stride, in_channels=64):
  pad = kernel // 2
  return conv.conv_plan((size, size), (kernel, kernel), (stride, stride), ((pad, pad),) * 2,
                        in_channels)


L, P, F = conv.LAX, conv.PATCHES, conv.FEATURE_MAJOR_PATCHES


@pytest.mark.parametrize('image_size,layer,size,kernel,stride,in_channels,want', [
    # 224 px (the paper): large maps by XLA's convolution, stage 4 (7 x 7) by patches.
    (224, 'stem 7x7/2', 224, 7, 2, 3, (L, P, F)),
    (224, 'layer1 3x3', 56, 3, 1, 64, (L, L, P)),
    (224, 'layer2_0 3x3/2', 56, 3, 2, 64, (L, P, P)),
    (224, 'layer2 downsample 1x1/2', 56, 1, 2, 64, (P, P, P)),
    (224, 'layer2 3x3', 28, 3, 1, 128, (L, L, P)),
    (224, 'layer3 3x3', 14, 3, 1, 256, (L, L, P)),
    (224, 'layer4_0 3x3/2', 14, 3, 2, 256, (P, P, P)),
    (224, 'layer4 3x3', 7, 3, 1, 512, (P, P, P)),
    # 64 px: stages 1-2 by XLA, 3-4 (4 x 4, 2 x 2; XLA's slow case) by patches.
    (64, 'stem 7x7/2', 64, 7, 2, 3, (L, P, F)),
    (64, 'layer1 3x3', 16, 3, 1, 64, (L, L, P)),
    (64, 'layer2 3x3', 8, 3, 1, 128, (L, L, P)),
    (64, 'layer3_0 3x3/2', 8, 3, 2, 128, (P, P, P)),
    (64, 'layer3 3x3', 4, 3, 1, 256, (P, P, P)),
    (64, 'layer4_0 3x3/2', 4, 3, 2, 256, (P, P, P)),
    (64, 'layer4 3x3', 2, 3, 1, 512, (P, P, P)),
])
def test_plan_of_resnet18_layers(image_size, layer, size, kernel, stride, in_channels, want):
  del image_size, layer  # In the test id.
  assert _plan(size, kernel, stride, in_channels) == conv.ConvPlan(*want)


def test_plan_depends_on_static_shapes_only():
  # The same shapes give the same plan (a hashable, frozen value): no retracing per call.
  assert _plan(56, 3, 1) == _plan(56, 3, 1)
  assert hash(_plan(56, 3, 1)) == hash(_plan(56, 3, 1))


@pytest.mark.parametrize('size,kernel,strides,channels', [
    (16, 3, (1, 1), 4),  # A large map: XLA's forward pass and input gradient.
    (3, 3, (1, 1), 4),   # A small one: patches.
    (19, 7, (2, 2), 3),  # Stem-like: feature-major kernel gradient.
])
def test_hook_follows_the_plan_and_matches_lax(size, kernel, strides, channels):
  pad = ((kernel // 2,) * 2,) * 2
  x = jax.random.normal(jax.random.key(5), (2, size, size, channels))
  w = jax.random.normal(jax.random.key(6), (kernel, kernel, channels, 6))
  hooked = lambda x, w: conv.conv_general_dilated(x, w, strides, pad, dimension_numbers=NHWC)
  lax_conv = lambda x, w: _lax(x, w, strides, pad)
  np.testing.assert_allclose(hooked(x, w), lax_conv(x, w), rtol=1e-5, atol=1e-5)
  got = jax.grad(lambda x, w: jnp.sum(hooked(x, w) ** 2), argnums=(0, 1))(x, w)
  want = jax.grad(lambda x, w: jnp.sum(lax_conv(x, w) ** 2), argnums=(0, 1))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-3)
  plan = conv.conv_plan((size, size), (kernel, kernel), strides, pad, channels)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda w: jnp.sum(hooked(x, w))))(w))
  if jax.default_backend() == 'cpu':
    assert ('conv_general_dilated' in jaxpr) == (conv.LAX in (plan.forward, plan.kernel_grad))
