"""2-D convolution on XLA's CPU backend: each of its three products by the faster method.

A convolution's training cost is three products: the forward pass, the input gradient and
the kernel gradient. XLA's CPU convolution is fast for some of them and pathologically slow
for others; patches times a matrix (im2col: the ``[N, H_out, W_out, kh * kw * C]`` patches,
gathered with plain slices, times the ``[kh * kw * C, O]`` kernel) is the reverse. Measured
on this project's 2-core Xeon (jax 0.10.2, float32, see benchmarks/RESULTS.md):

* Small maps with many channels: a 3x3, 512-channel convolution of ResNet-18's ``2 x 2``
  last-stage map (64 px, batch 16) took XLA 470 ms forward and 360 ms for its input gradient,
  against 7 and 3 ms as patches; the stride-2 input gradient onto a ``4 x 4`` map 72 ms
  against 3.
* Large maps: at 224 px, batch 32, XLA's forward convolution is 2-3x faster than patches
  (``56 x 56 x 64`` 3x3: 67 against 171 ms; the 7x7 stem: 147 against 276 ms), and so is its
  stride-1 input gradient (63 against 115 ms), because patches write and read
  ``kh * kw`` times the input.
* Kernel gradients and stride-2 input gradients: patches are as fast or faster everywhere
  (the stem's kernel gradient: 397 against 705 ms; 1x1 convolutions 3-4x), and the patches
  of a layer's input are the same array that ghost clipping (:mod:`dpjax.ghost_clipping`)
  builds for its per-example norms, which XLA then computes once.

:func:`conv_plan` chooses a method for each product from the static shapes alone (so the
choice never recompiles anything): XLA's convolution for the forward pass when the output
map has at least :data:`LAX_MIN_OUTPUT_POSITIONS` positions (kernel larger than 1x1), and for
the input gradient under the same condition with stride 1; patches otherwise and for every
kernel gradient. :func:`conv_general_dilated` is a drop-in for ``jax.lax.conv_general_dilated``
(flax's ``nn.Conv(conv_general_dilated=...)`` hook): on the CPU backend, for the plain case
(NHWC / HWIO, no dilation, one feature group), it runs the plan through a ``jax.custom_jvp``
whose tangent is the sum of the two planned products, so reverse mode (their transposes),
forward mode, ``vmap`` and higher derivatives all work; otherwise and on accelerators, whose
convolution libraries are fast, it is the lax convolution. Every method computes the same
sums, so results agree with lax's convolution to float rounding (the sums run in another
order).

:func:`extract_patches` is shared with :mod:`dpjax.ghost_clipping`, which builds per-example
gradient norms of convolutions from the same patches.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import custom_derivatives, lax

# (lhs, rhs, out) specs of NHWC inputs, HWIO kernels and NHWC outputs, as flax builds them.
_NHWC_SPECS = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))

LAX = 'lax'  # XLA's own convolution (and, for gradients, its transposes).
PATCHES = 'patches'  # Patches times the reshaped kernel (and that product's transposes).
# Patches built feature-major, ``[kh * kw * C, N * H_out * W_out]``: the kernel gradient is then
# one matmul with no transposed copy of the (large) output gradient. Kernel gradients only.
FEATURE_MAJOR_PATCHES = 'feature_major_patches'
# Output maps with at least this many positions (8 x 8) run the forward pass and the stride-1
# input gradient as XLA convolutions on the CPU; smaller maps as patches. ResNet-18 at 64 px:
# stages 1-2 (16 x 16, 8 x 8) by XLA, 3-4 (4 x 4, 2 x 2) by patches; at 224 px stages 1-3
# (56 x 56 to 14 x 14) by XLA, stage 4 (7 x 7) by patches.
LAX_MIN_OUTPUT_POSITIONS = 64
# Inputs with at most this many channels (RGB or grey images: the stem) take the kernel
# gradient from feature-major patches. With NHWC patches XLA makes a transposed copy of the
# output gradient for that matmul, fused into the normalisation's backward pass and slow
# (ResNet-18's stem at 224 px, batch 32: 0.4 s of a 4.2 s step on 2 busy cores); the
# transposed input of a 3-channel layer is small. Wider inputs keep NHWC patches, which are
# cheaper to build there and are the array ghost clipping's norms also use (XLA shares it).
FEATURE_MAJOR_MAX_IN_CHANNELS = 4


@dataclasses.dataclass(frozen=True)
class ConvPlan:
  """The method (:data:`LAX` or :data:`PATCHES`) of each product of one convolution."""

  forward: str
  input_grad: str
  kernel_grad: str


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


def output_hw(input_hw: Sequence[int], kernel_hw: Sequence[int], strides: Sequence[int],
              padding: str | Sequence[tuple[int, int]]) -> tuple[int, int]:
  """Spatial size of the convolution's output."""
  pads = explicit_padding(padding, input_hw, kernel_hw, strides)
  return tuple((size + low + high - kernel) // stride + 1 for size, (low, high), kernel, stride
               in zip(input_hw, pads, kernel_hw, strides))


def conv_plan(input_hw: Sequence[int], kernel_hw: Sequence[int], strides: Sequence[int],
              padding: str | Sequence[tuple[int, int]], in_channels: int) -> ConvPlan:
  """The CPU method of each product, a pure function of the static shapes (module docstring).

  >>> conv_plan((56, 56), (3, 3), (1, 1), ((1, 1), (1, 1)), 64)  # ResNet-18 stage 1, 224 px.
  ConvPlan(forward='lax', input_grad='lax', kernel_grad='patches')
  >>> conv_plan((2, 2), (3, 3), (1, 1), ((1, 1), (1, 1)), 512)  # Stage 4, 64 px.
  ConvPlan(forward='patches', input_grad='patches', kernel_grad='patches')
  """
  out_h, out_w = output_hw(input_hw, kernel_hw, strides, padding)
  large = out_h * out_w >= LAX_MIN_OUTPUT_POSITIONS and tuple(kernel_hw) != (1, 1)
  return ConvPlan(
      forward=LAX if large else PATCHES,
      input_grad=LAX if large and tuple(strides) == (1, 1) else PATCHES,
      kernel_grad=FEATURE_MAJOR_PATCHES if in_channels <= FEATURE_MAJOR_MAX_IN_CHANNELS
      else PATCHES)


def extract_patches_feature_major(images: jax.Array, kernel_hw: Sequence[int],
                                  strides: Sequence[int],
                                  padding: str | Sequence[tuple[int, int]]) -> jax.Array:
  """NHWC images -> ``[kh * kw * C, N * H_out * W_out]``: :func:`extract_patches` transposed.

  Built from the input transposed once to ``[C, N, H, W]``, so each slice is a contiguous block.
  """
  kernel_h, kernel_w = kernel_hw
  stride_h, stride_w = strides
  pads = explicit_padding(padding, images.shape[1:3], kernel_hw, strides)
  padded = jnp.pad(images, ((0, 0), *pads, (0, 0))).transpose(3, 0, 1, 2)
  out_h = (padded.shape[2] - kernel_h) // stride_h + 1
  out_w = (padded.shape[3] - kernel_w) // stride_w + 1
  shifted = [
      padded[:, :, i:i + stride_h * (out_h - 1) + 1:stride_h, j:j + stride_w * (out_w - 1) + 1:stride_w]
      for i in range(kernel_h) for j in range(kernel_w)
  ]
  patches = shifted[0] if len(shifted) == 1 else jnp.concatenate(shifted, axis=0)
  return patches.reshape(kernel_h * kernel_w * images.shape[3], -1)


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


def _nhwc_conv(method: str, lhs, rhs, window_strides, padding, precision,
               preferred_element_type) -> jax.Array:
  if method == FEATURE_MAJOR_PATCHES:
    kernel_h, kernel_w, in_channels, out_channels = rhs.shape
    patches_t = extract_patches_feature_major(lhs, (kernel_h, kernel_w), window_strides, padding)
    out = lax.dot_general(patches_t, rhs.reshape(-1, out_channels), (((0,), (0,)), ((), ())),
                          precision=precision, preferred_element_type=preferred_element_type)
    out_h, out_w = output_hw(lhs.shape[1:3], (kernel_h, kernel_w), window_strides, padding)
    return out.reshape(lhs.shape[0], out_h, out_w, out_channels)
  if method == PATCHES:
    return conv_by_patches(lhs, rhs, window_strides, padding, precision, preferred_element_type)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=precision,
                                  preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5, 6))
def _planned_conv(lhs, rhs, window_strides, padding, precision, preferred_element_type,
                  plan: ConvPlan):
  return _nhwc_conv(plan.forward, lhs, rhs, window_strides, padding, precision,
                    preferred_element_type)


def _planned_conv_jvp(window_strides, padding, precision, preferred_element_type, plan,
                      primals, tangents):
  # The convolution is bilinear: its tangent is conv(lhs_dot, rhs) + conv(lhs, rhs_dot), each
  # by its planned method. Reverse mode transposes them: the first gives the input gradient,
  # the second the kernel gradient (patches^T g for PATCHES).
  lhs, rhs = primals
  lhs_dot, rhs_dot = tangents
  args = (window_strides, padding, precision, preferred_element_type)
  out = _planned_conv(lhs, rhs, *args, plan)
  terms = []
  if not isinstance(lhs_dot, custom_derivatives.SymbolicZero):
    terms.append(_nhwc_conv(plan.input_grad, lhs_dot, rhs, *args))
  if not isinstance(rhs_dot, custom_derivatives.SymbolicZero):
    terms.append(_nhwc_conv(plan.kernel_grad, lhs, rhs_dot, *args))
  out_dot = functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(out)
  return out, out_dot.astype(out.dtype)


_planned_conv.defjvp(_planned_conv_jvp, symbolic_zeros=True)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """``lax.conv_general_dilated``; on the CPU backend, plain NHWC by :func:`conv_plan`."""
  if jax.default_backend() == 'cpu' and is_plain_nhwc(
      lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
      batch_group_count):
    kernel_hw, strides = tuple(rhs.shape[:2]), tuple(window_strides)
    pads = tuple(tuple(pair) for pair in explicit_padding(padding, lhs.shape[1:3], kernel_hw,
                                                          strides))
    plan = conv_plan(lhs.shape[1:3], kernel_hw, strides, pads, rhs.shape[2])
    if plan == ConvPlan(PATCHES, PATCHES, PATCHES):  # Plain autodiff of patches is the plan.
      return conv_by_patches(lhs, rhs, strides, pads, precision, preferred_element_type)
    return _planned_conv(lhs, rhs, strides, pads, precision, preferred_element_type, plan)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
