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
