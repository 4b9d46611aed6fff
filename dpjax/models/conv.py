"""2-D convolution as patches times a matrix (im2col), for XLA's CPU backend.

XLA's CPU convolution is pathologically slow for small spatial maps with many channels:
measured on this project's 2-core Xeon (jax 0.10.2), a 3x3 convolution of a
``[16, 2, 2, 512]`` map with 512 filters (ResNet-18's last stage at 64 px) ran at 3.8
GFLOP/s forward and its gradient took 174 ms, against 3 ms forward and 8 ms for the
gradient as patches times a matrix. The patches are gathered with plain slices, so their
gradient is cheap too. The other ResNet-18 shapes are about as fast either way.

:func:`conv_general_dilated` is a drop-in for ``jax.lax.conv_general_dilated`` (flax's
``nn.Conv(conv_general_dilated=...)`` hook): it uses patches times a matrix on the CPU for
the plain case (NHWC / HWIO, no dilation, one feature group) and the lax convolution
otherwise and on accelerators, whose convolution libraries are fast. Results agree to
float32 rounding (the sum runs in another order).

:func:`extract_patches` is shared with :mod:`dpjax.ghost_clipping`, which builds
per-example gradient norms of convolutions from the same patches.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

# (lhs, rhs, out) specs of NHWC inputs, HWIO kernels and NHWC outputs, as flax builds them.
_NHWC_SPECS = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def explicit_padding(padding: str | Sequence[tuple[int, int]], input_hw: Sequence[int],
                     kernel_hw: Sequence[int], strides: Sequence[int]) -> list[tuple[int, int]]:
  """Padding as (low, high) pairs per spatial dimension ('SAME'/'VALID' resolved as lax does)."""
  if isinstance(padding, str):
    return list(lax.padtype_to_pads(tuple(input_hw), tuple(kernel_hw), tuple(strides), padding))
  return [tuple(pair) for pair in padding]


def extract_patches(images: jax.Array, kernel_hw: Sequence[int], strides: Sequence[int],
                    padding: str | Sequence[tuple[int, int]]) -> jax.Array:
  """NHWC images -> ``[N, H_out, W_out, kh * kw * C]`` patches, ordered (kh, kw, C).

  With this order, ``patches @ kernel.reshape(-1, out)`` is the convolution with an HWIO
  ``kernel`` (cross-correlation, as in lax and torch).
  """
  kernel_h, kernel_w = kernel_hw
  stride_h, stride_w = strides
  pads = explicit_padding(padding, images.shape[1:3], kernel_hw, strides)
  padded = jnp.pad(images, ((0, 0), *pads, (0, 0)))
  out_h = (padded.shape[1] - kernel_h) // stride_h + 1
  out_w = (padded.shape[2] - kernel_w) // stride_w + 1
  shifted = [
      padded[:, i:i + stride_h * (out_h - 1) + 1:stride_h, j:j + stride_w * (out_w - 1) + 1:stride_w]
      for i in range(kernel_h) for j in range(kernel_w)
  ]
  return shifted[0] if len(shifted) == 1 else jnp.concatenate(shifted, axis=-1)


def _dimension_specs(dimension_numbers) -> tuple | None:
  if dimension_numbers is None:
    return None
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return tuple(tuple(spec) for spec in dimension_numbers)
  if tuple(dimension_numbers) == ('NHWC', 'HWIO', 'NHWC'):
    return _NHWC_SPECS
  return None


def is_plain_nhwc(lhs, rhs, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                  feature_group_count: int = 1, batch_group_count: int = 1) -> bool:
  """Whether the convolution is the plain 2-D NHWC/HWIO case that patches handle."""
  no_dilation = all(d is None or all(x == 1 for x in d) for d in (lhs_dilation, rhs_dilation))
  return (jnp.ndim(lhs) == 4 and jnp.ndim(rhs) == 4 and no_dilation
          and feature_group_count == 1 and batch_group_count == 1
          and _dimension_specs(dimension_numbers) == _NHWC_SPECS)


def conv_by_patches(lhs, rhs, window_strides, padding, precision=None,
                    preferred_element_type=None) -> jax.Array:
  """NHWC x HWIO convolution computed as patches times the reshaped kernel."""
  kernel_h, kernel_w, in_channels, out_channels = rhs.shape
  patches = extract_patches(lhs, (kernel_h, kernel_w), window_strides, padding)
  return jnp.einsum('nhwk,ko->nhwo', patches,
                    rhs.reshape(kernel_h * kernel_w * in_channels, out_channels),
                    precision=precision, preferred_element_type=preferred_element_type)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """``lax.conv_general_dilated``, by patches on the CPU backend for plain NHWC convolutions."""
  if jax.default_backend() == 'cpu' and is_plain_nhwc(
      lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
      batch_group_count):
    return conv_by_patches(lhs, rhs, window_strides, padding, precision, preferred_element_type)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
