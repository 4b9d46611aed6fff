"""ScatterNet classifiers: a fixed wavelet scattering transform, then a small trained head.

Tramer and Boneh, "Differentially Private Learning Needs Better Features (or Much More Data)",
ICLR 2021 (code: github.com/ftramer/Handcrafted-DP), train linear models and small CNNs with
DP-SGD on the scattering features of Oyallon and Mallat (2015) and beat end-to-end CNNs at
moderate privacy budgets: only the head is learned, so the noise DP-SGD adds is spread over
few coordinates.

The model (:class:`ScatterNet`) takes what every dpjax model takes, NHWC images normalised
with the ImageNet mean and standard deviation (:func:`dpjax.data.preprocess.normalize`), and:

1. undoes that normalisation to get [0, 1] pixels;
2. scatters them (:func:`scattering`, kymatio's 2-D transform, order 2, ``J`` scales and ``L``
   angles): one grey channel (the mean of the three) when ``grayscale`` (chest X-rays, stored
   as three equal channels), else each colour channel (fundus photographs). Every channel
   gives ``1 + J L + L^2 J (J - 1) / 2`` maps (81 for J=2, L=8) at ``1 / 2^J`` of the image
   size: 64 px images give ``16 x 16 x 81`` features (grey) or ``16 x 16 x 243`` (colour);
3. normalises the features per example (``feature_norm``): ``'group_norm'``, a GroupNorm
   without affine parameters, or ``'data_norm'``, a fixed per-channel standardisation whose
   mean and variance the caller sets from a private estimate (see below);
4. classifies them: ``'linear'`` (arch ``'scatternet'``), one Dense layer ``fc`` on the
   flattened features, or ``'cnn'`` (arch ``'scatternet_cnn'``), two 3x3 conv blocks with
   max pooling and then ``fc``.

Privacy: the scattering transform is fixed and data-independent (wavelet filters computed
from ``J``, ``L`` and the image size only, no parameters, no gradient), so it is public
post-processing of each example and costs no privacy. Everything after it is per-example as
well (no batch statistics), so per-example clipping (:mod:`dpjax.clipping`,
:mod:`dpjax.ghost_clipping`) bounds each example's influence as for any DP-safe dpjax model.
The one exception is the caller's: ``'data_norm'`` reads ``feature_mean`` and ``feature_var``
from the ``'batch_stats'`` collection and never updates them. If they are computed from the
private training data they MUST come from a differentially private estimate (Tramer and
Boneh's clipped, noised feature means and second moments, whose privacy cost is added to
DP-SGD's), computed with :func:`scattering_features`; exact training-set statistics void the
DP guarantee. ``'group_norm'`` needs no statistics at all.

>>> num_scattering_channels(J=2, L=8)
81
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax.data import preprocess
from dpjax.models import resnet

LINEAR = 'linear'
CNN = 'cnn'
HEADS = (LINEAR, CNN)

GROUP_NORM = 'group_norm'
DATA_NORM = 'data_norm'
FEATURE_NORMS = (GROUP_NORM, DATA_NORM)

# torch's GroupNorm epsilon, which Tramer and Boneh's code uses; also their standardisation's.
FEATURE_EPSILON = 1e-5
# Tramer and Boneh tune the GroupNorm's groups in {9, 27, 81} over their 243 CIFAR-10 channels
# and use 27 (9 consecutive channels of one colour per group); 27 also divides the 81 grey
# channels (3 per group).
DEFAULT_FEATURE_GROUPS = 27


def num_scattering_channels(J: int, L: int) -> int:
  """Maps per input channel of an order-2 scattering: 1 + J L + L^2 J (J - 1) / 2."""
  return 1 + J * L + L * L * J * (J - 1) // 2


@functools.lru_cache(maxsize=32)
def _transform(J: int, L: int, shape: tuple[int, int]):
  """kymatio's JAX scattering object for `shape` images: building the filters is NumPy work.

  Imported here, not at the top: ``import dpjax`` must not need kymatio. (Its top-level
  ``kymatio.jax`` does not import with current SciPy; the frontend module does.)
  """
  from kymatio.scattering2d.frontend.jax_frontend import ScatteringJax2D

  return ScatteringJax2D(J=J, shape=shape, L=L, max_order=2)


def scattering(images: jax.Array, J: int = 2, L: int = 8) -> jax.Array:
  """Order-2 scattering of each channel of NHWC images, NHWC out, float32, no gradient.

  Args:
    images: ``[B, H, W, C]`` pixels (the model passes [0, 1] values), any float dtype; they
      are converted to float32 and the transform runs in float32 whatever the dtype.
    J: number of scales; the output is ``2^J`` times smaller (kymatio pads by reflection and
      needs ``H, W >= 2^J``).
    L: number of angles.

  Returns:
    ``[B, H', W', C * K]`` with ``K = num_scattering_channels(J, L)`` and ``H' = H / 2^J``
    (for ``H`` a multiple of ``2^J``). Channel ``c * K + k`` is kymatio's coefficient ``k`` of
    input channel ``c`` (kymatio's order: the low-pass, then order 1, then order 2), the
    layout of Tramer and Boneh's ``[B, C * K, H', W']`` features. Wrapped in
    ``jax.lax.stop_gradient``: the transform is fixed, nothing is learned through it.

  Works under ``jax.jit`` and ``jax.vmap``; the kymatio object (filters) is cached per
  ``(J, L, (H, W))``.
  """
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f'Expected NHWC images [B, H, W, C], got shape {images.shape}')
  batch, height, width, _ = images.shape
  transform = _transform(int(J), int(L), (int(height), int(width)))
  # No tangent enters the FFTs: differentiating the model never traces through them.
  planes = jax.lax.stop_gradient(jnp.transpose(images.astype(jnp.float32), (0, 3, 1, 2)))
  coefficients = transform.scattering(planes)  # [B, C, K, H', W'], float32 filters.
  out_h, out_w = coefficients.shape[-2:]
  features = coefficients.reshape(batch, -1, out_h, out_w).transpose(0, 2, 3, 1)
  return jax.lax.stop_gradient(features.astype(jnp.float32))


def unnormalize(images: jax.Array) -> jax.Array:
  """[0, 1] pixels of ImageNet-normalised NHWC RGB images, float32.

  The inverse of :func:`dpjax.data.preprocess.normalize`, up to float32 rounding.
  """
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'Expected ImageNet-normalised RGB images [B, H, W, 3], got shape'
                     f' {images.shape}')
  mean = jnp.asarray(preprocess.IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(preprocess.IMAGENET_STD, jnp.float32)
  return images.astype(jnp.float32) * std + mean


def scattering_features(model_or_config: Any, images: jax.Array) -> jax.Array:
  """The un-normalised scattering features `model_or_config` computes from `images`.

  For estimating ``'data_norm'`` statistics (privately: see the module docstring) and for
  inspection. `model_or_config` is a :class:`ScatterNet` or anything with its ``grayscale``,
  ``J`` and ``L`` attributes; `images` are the model's inputs, ImageNet-normalised NHWC RGB.

  Returns:
    float32 ``[B, H / 2^J, W / 2^J, K]`` per-example features (row b from image b alone), no
    gradient: ``K = num_scattering_channels(J, L)`` (81 for J=2, L=8) of the grey image when
    ``grayscale``, else ``3 K`` (channel ``c K + k``: colour c, coefficient k). They are
    what the model's feature normalisation receives; a ``'data_norm'`` model subtracts
    ``feature_mean[k]`` and divides by ``sqrt(feature_var[k] + eps)`` on the last axis, so
    the statistics to estimate are, per channel, the mean and variance over examples and
    positions.
  """
  pixels = unnormalize(images)
  if model_or_config.grayscale:
    pixels = jnp.mean(pixels, axis=-1, keepdims=True)  # Chest X-rays: three equal channels.
  return scattering(pixels, model_or_config.J, model_or_config.L)


class ConvBlock(nn.Module):
  """3x3 convolution, `norm` layer (ResNet's, named ``bn``), ReLU, 2x2 max pooling."""

  filters: int
  norm: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    # As in the ResNets: a bias-free conv (the norm layer has the bias), torch's init and the
    # CPU-friendly convolution, then the norm layer chosen by `norm`.
    x = resnet.conv_layer(self.filters, 3, 1, 'conv', self.dtype)(x)
    x = resnet.norm_layer(self.norm, train, self.filters, 'bn', self.dtype)(x)
    return nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))


class ScatterNet(nn.Module):
  """Fixed scattering features, per-example feature normalisation, a small trained head.

  See the module docstring for the pipeline and the privacy notes.

  Attributes:
    num_classes: outputs of the head's final Dense layer ``fc``.
    norm: normalisation of the CNN head's conv blocks, as for the ResNets ('group_norm',
      'frozen_bn' or 'batch_norm'; the last mixes examples: non-private runs only). The
      linear head has no such layers and ignores it (any valid name is accepted).
    dtype: computation dtype of the normalisation and the head (parameters are float32); the
      scattering is float32 whatever it is.
    grayscale: scatter one grey channel (the mean of the three) instead of each colour.
    J: scales of the scattering (features are ``2^J`` times smaller than the images).
    L: angles of the scattering.
    feature_norm: 'group_norm' (GroupNorm over the scattering channels without affine
      parameters, ``feature_groups`` groups) or 'data_norm' (fixed standardisation by
      ``'batch_stats'`` ``feature_mean`` and ``feature_var``, never updated by the model).
    head: 'linear' (flatten, ``fc``) or 'cnn' (conv blocks ``layer1_0``, ``layer2_0``, ...,
      flatten, ``fc``).
    feature_groups: groups of the 'group_norm' feature normalisation; must divide the number
      of scattering channels.
    cnn_channels: output channels of the CNN head's conv blocks, each halving the map.

  Call ``apply(variables, x, train=bool)`` with ImageNet-normalised NHWC RGB images; returns
  logits. With ``feature_norm='data_norm'`` the variables have a ``'batch_stats'`` collection
  ``{'feature_mean': [C], 'feature_var': [C]}`` (``C = num_feature_channels``: the last axis
  of :func:`scattering_features`; initialised to 0 and 1) for the caller to set;
  a channel whose variance is not positive (a noisy estimate clamped at 0) is set to 0, as
  Tramer and Boneh's code does, instead of being divided by ``sqrt(eps)``.
  """

  num_classes: int
  norm: str = resnet.GROUP_NORM
  dtype: Any = jnp.float32
  grayscale: bool = False
  J: int = 2
  L: int = 8
  feature_norm: str = GROUP_NORM
  head: str = LINEAR
  feature_groups: int = DEFAULT_FEATURE_GROUPS
  cnn_channels: Sequence[int] = (32, 32)
  # True: the input is already `scattering_features(model, images)` (computed once per image
  # and cached by the caller); the parameters and the output are the same as from images.
  precomputed_features: bool = False

  @property
  def num_feature_channels(self) -> int:
    """Scattering channels the head sees: K (grey) or 3 K (colour)."""
    return num_scattering_channels(self.J, self.L) * (1 if self.grayscale else 3)

  def _normalize_features(self, x):
    channels = self.num_feature_channels
    if self.feature_norm == GROUP_NORM:
      if channels % self.feature_groups:
        raise ValueError(f'feature_groups={self.feature_groups} must divide the {channels}'
                         ' scattering channels')
      # Per example and data-independent. Two-pass variance (a group mixes the large low-pass
      # coefficient with small higher-order ones), numerically safer than E[x^2] - E[x]^2.
      return nn.GroupNorm(num_groups=self.feature_groups, epsilon=FEATURE_EPSILON,
                          use_scale=False, use_bias=False, use_fast_variance=False,
                          dtype=self.dtype, name='scattering_norm')(x)
    mean = self.variable('batch_stats', 'feature_mean', jnp.zeros, (channels,), jnp.float32)
    var = self.variable('batch_stats', 'feature_var', jnp.ones, (channels,), jnp.float32)
    # The scale in float32 at least (bfloat16 models), then the model's dtype.
    var = var.value.astype(jnp.promote_types(var.value.dtype, jnp.float32))
    scale = jnp.where(var > 0, jax.lax.rsqrt(jnp.maximum(var, 0) + FEATURE_EPSILON), 0)
    return (x - mean.value.astype(self.dtype)) * scale.astype(self.dtype)

  @nn.compact
  def __call__(self, x, train: bool):
    resnet.check_norm(self.norm)
    if self.head not in HEADS:
      raise ValueError(f'Unknown head={self.head!r}; expected one of {HEADS}')
    if self.feature_norm not in FEATURE_NORMS:
      raise ValueError(f'Unknown feature_norm={self.feature_norm!r}; expected one of'
                       f' {FEATURE_NORMS}')
    if not self.precomputed_features:
      x = scattering_features(self, x)  # Fixed: no parameters, no gradient.
    x = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32)).astype(self.dtype)
    x = self._normalize_features(x)
    if self.head == LINEAR:
      # Zero init (Tramer and Boneh keep torch's uniform one): the model is linear in its
      # parameters and its loss convex, so a random start breaks no symmetry and only adds a
      # random offset over tens of thousands of weights that the noisy steps must undo; zero
      # starts at the uniform prediction, the usual choice for DP linear heads.
      kernel_init, bias_init = nn.initializers.zeros, nn.initializers.zeros
    else:
      for stage, filters in enumerate(self.cnn_channels):
        # `layer{stage}_0` like the ResNets' blocks: trainable='last_stage' trains the last.
        x = ConvBlock(filters, self.norm, self.dtype, name=f'layer{stage + 1}_0')(x, train)
      # The CNN's head as the ResNets' (torch's default): a zero head would give the conv
      # layers no gradient on the first step.
      kernel_init, bias_init = resnet.HEAD_KERNEL_INIT, resnet.HEAD_BIAS_INIT
    # Flattened, as Tramer and Boneh do: where a feature lies in the image is kept.
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes, kernel_init=kernel_init, bias_init=bias_init,
                    dtype=self.dtype, name=resnet.HEAD_NAME)(x)


# What `resnet.create_model`'s archs 'scatternet' and 'scatternet_cnn' build.
ScatterNetLinear = functools.partial(ScatterNet, head=LINEAR)
ScatterNetCNN = functools.partial(ScatterNet, head=CNN)
