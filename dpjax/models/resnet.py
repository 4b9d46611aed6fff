"""ResNet in Flax linen, built layer for layer like torchvision's `resnet18`.

The module and parameter names follow torchvision's state-dict names so that the
weight port (`dpjax.weights`) is a plain rename: torchvision `layer2.0.downsample.1`
is Flax `layer2_0/downsample_bn`. Normalisation layers keep the `bn` names whatever
`norm` is, so one name map serves every variant.

Normalisation choices (`norm`):

* ``'frozen_bn'``: BatchNorm that always normalises with the running statistics in
  the ``'batch_stats'`` collection and never updates them, also with ``train=True``.
  Each example's output then depends on that example alone, which is what per-example
  gradient clipping (DP-SGD) needs. The affine scale and bias stay trainable.
* ``'batch_norm'``: ordinary BatchNorm: batch statistics in training mode and
  running-statistic updates (call ``apply(..., mutable=['batch_stats'])``). It mixes
  examples within a batch, so a single example's gradient is no longer its own and the
  DP-SGD sensitivity analysis fails: use it for non-private runs only. (One difference
  from torch: Flax averages the biased batch variance into the running variance, torch the
  unbiased one.)
* ``'group_norm'``: GroupNorm with ``min(32, channels)`` groups (Opacus's replacement
  for BatchNorm); per-example, no ``'batch_stats'``.

>>> import jax, jax.numpy as jnp
>>> model = ResNetTiny(num_classes=3)
>>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
>>> model.apply(variables, jnp.zeros((2, 32, 32, 3)), train=True).shape
(2, 3)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dpjax.models import conv

FROZEN_BN = 'frozen_bn'
BATCH_NORM = 'batch_norm'
GROUP_NORM = 'group_norm'
NORMS = (FROZEN_BN, BATCH_NORM, GROUP_NORM)
# Norms under which each example's output depends on that example only, so per-example
# gradients (and hence clipping sensitivity) are well defined.
DP_SAFE_NORMS = frozenset({FROZEN_BN, GROUP_NORM})

# torch.nn.BatchNorm2d defaults: eps 1e-5, running = 0.9 * running + 0.1 * batch
# (torch's momentum 0.1 is Flax's momentum 0.9).
BATCH_NORM_EPSILON = 1e-5
BATCH_NORM_MOMENTUM = 0.9
GROUP_NORM_MAX_GROUPS = 32

# torchvision initialises convolutions with kaiming_normal_(mode='fan_out', relu).
CONV_KERNEL_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# torch.nn.Linear's default weight init is U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the head
# bias starts at zero (torch draws it from the same uniform; zero is the usual choice
# for a freshly attached fine-tuning head).
HEAD_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
HEAD_BIAS_INIT = nn.initializers.zeros


def check_norm(norm: str) -> str:
  if norm not in NORMS:
    raise ValueError(f'Unknown {norm=}; expected one of {NORMS}')
  return norm


def is_dp_safe(norm: str) -> bool:
  """Whether `norm` keeps examples independent, as DP-SGD's per-example clipping needs."""
  return check_norm(norm) in DP_SAFE_NORMS


def _norm_layer(norm: str, train: bool, channels: int, name: str, dtype: Any) -> nn.Module:
  if norm == GROUP_NORM:
    return nn.GroupNorm(
        num_groups=min(GROUP_NORM_MAX_GROUPS, channels),
        epsilon=BATCH_NORM_EPSILON,
        dtype=dtype,
        name=name,
    )
  return nn.BatchNorm(
      # Frozen BN reads the running statistics in training mode too and never writes them.
      use_running_average=(norm == FROZEN_BN) or not train,
      momentum=BATCH_NORM_MOMENTUM,
      epsilon=BATCH_NORM_EPSILON,
      dtype=dtype,
      name=name,
  )


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Any) -> nn.Conv:
  # torch pads symmetrically by kernel // 2; Flax 'SAME' pads asymmetrically at stride 2.
  pad = kernel // 2
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      use_bias=False,
      kernel_init=CONV_KERNEL_INIT,
      dtype=dtype,
      # Patches times a matrix on the CPU, where XLA's convolution is slow on small maps.
      conv_general_dilated=conv.conv_general_dilated,
      name=name,
  )


# The ResNets' layer builders, shared with the ScatterNet CNN (dpjax.models.scatternet).
conv_layer = _conv
norm_layer = _norm_layer


class BasicBlock(nn.Module):
  """torchvision's BasicBlock: two 3x3 convs; 1x1 conv + norm shortcut on a shape change."""

  filters: int
  strides: int
  norm: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    shortcut = x
    y = _conv(self.filters, 3, self.strides, 'conv1', self.dtype)(x)
    y = _norm_layer(self.norm, train, self.filters, 'bn1', self.dtype)(y)
    y = nn.relu(y)
    y = _conv(self.filters, 3, 1, 'conv2', self.dtype)(y)
    y = _norm_layer(self.norm, train, self.filters, 'bn2', self.dtype)(y)
    if self.strides != 1 or x.shape[-1] != self.filters:
      shortcut = _conv(self.filters, 1, self.strides, 'downsample_conv', self.dtype)(x)
      shortcut = _norm_layer(self.norm, train, self.filters, 'downsample_bn', self.dtype)(shortcut)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """torchvision-style ResNet with BasicBlocks.

  Attributes:
    stage_sizes: blocks per stage; stage i has `num_filters * 2**i` channels and, from
      the second stage on, starts with a stride-2 block.
    num_filters: channels of the stem and the first stage.
    num_classes: outputs of the linear head `fc`.
    norm: 'frozen_bn' (default), 'batch_norm' or 'group_norm'; see the module docstring.
    dtype: computation dtype (parameters are float32).

  Call `apply(variables, x, train=bool)` with NHWC float images; returns logits.
  """

  stage_sizes: Sequence[int]
  num_filters: int = 64
  num_classes: int = 1000
  norm: str = FROZEN_BN
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    check_norm(self.norm)
    if x.ndim != 4:
      raise ValueError(f'Expected NHWC images, got shape {x.shape}')
    x = jnp.asarray(x, self.dtype)
    x = _conv(self.num_filters, 7, 2, 'conv1', self.dtype)(x)
    x = _norm_layer(self.norm, train, self.num_filters, 'bn1', self.dtype)(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        x = BasicBlock(
            filters=self.num_filters * 2**stage,
            strides=2 if stage > 0 and block == 0 else 1,
            norm=self.norm,
            dtype=self.dtype,
            name=f'layer{stage + 1}_{block}',
        )(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(
        self.num_classes,
        kernel_init=HEAD_KERNEL_INIT,
        bias_init=HEAD_BIAS_INIT,
        dtype=self.dtype,
        name='fc',
    )(x)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), num_filters=64)
# For tests only: same structure (stem, a plain stage, a stride-2 stage with downsample).
ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1), num_filters=8)

# A small ResNet (stem, three one-block stages of 16/32/64 channels: 79k parameters against
# ResNet-18's 11.2M) for training from scratch under DP-SGD: the noise a step adds grows with
# the number of trained coordinates, the signal does not, so without pretrained features a
# small network is what learns (Tramer and Boneh 2021). No ImageNet weights exist for it.
ResNet8 = functools.partial(ResNet, stage_sizes=(1, 1, 1), num_filters=16)


def _scatternet(*, head: str, **kwargs) -> nn.Module:
  """`dpjax.models.scatternet.ScatterNet(head=head, **kwargs)`, that module imported on use.

  (It builds on this module, so this one cannot import it at the top.)
  """
  from dpjax.models import scatternet  # pylint: disable=import-outside-toplevel

  return scatternet.ScatterNet(head=head, **kwargs)


# Scattering features and a trained linear head or small CNN (Tramer and Boneh 2021): see
# dpjax.models.scatternet. They also take `grayscale`.
SCATTERNET_ARCHITECTURES = ('scatternet', 'scatternet_cnn')
ARCHITECTURES = {'resnet18': ResNet18, 'resnet8': ResNet8, 'tiny': ResNetTiny,
                 'scatternet': functools.partial(_scatternet, head='linear'),
                 'scatternet_cnn': functools.partial(_scatternet, head='cnn')}


# Which parameters a fine-tuning run trains; the others stay at their (pretrained) values.
TRAINABLE = ('all', 'last_stage', 'head')
HEAD_NAME = 'fc'


def trainable_modules(params, trainable: str) -> tuple[str, ...]:
  """Top-level module names of `params` that `trainable` trains ('all', 'last_stage', 'head').

  'head' is the final Dense layer; 'last_stage' adds the blocks of the deepest stage.
  """
  if trainable not in TRAINABLE:
    raise ValueError(f'Expected trainable in {TRAINABLE}, got {trainable!r}')
  names = tuple(params)
  if trainable == 'all':
    return names
  if trainable == 'head':
    return (HEAD_NAME,)
  last = max(int(n[len('layer'):].split('_')[0]) for n in names if n.startswith('layer'))
  return tuple(n for n in names if n == HEAD_NAME or n.startswith(f'layer{last}_'))


def split_params(params, trainable: str) -> tuple[dict, dict]:
  """(trained, frozen): the parameters `trainable` trains, and the rest."""
  names = set(trainable_modules(params, trainable))
  return ({k: v for k, v in params.items() if k in names},
          {k: v for k, v in params.items() if k not in names})


def merge_params(trained: dict, frozen: dict) -> dict:
  """The full parameter tree again (inverse of `split_params`)."""
  return {**frozen, **trained}


def create_model(num_classes: int, norm: str = FROZEN_BN, arch: str = 'resnet18',
                 dtype: Any = jnp.float32, grayscale: bool = False,
                 feature_norm: str = 'group_norm', precomputed_features: bool = False
                 ) -> nn.Module:
  """Builds `arch` (a key of `ARCHITECTURES`) with a `num_classes` head and `norm` layers.

  `dtype` is the computation dtype (e.g. bfloat16 on accelerators: activations and matmuls);
  parameters are float32 whatever it is. `grayscale` (the images' three channels are equal,
  e.g. chest X-rays) makes the ScatterNets ('scatternet', 'scatternet_cnn') scatter one grey
  channel instead of three; the ResNets ignore it. The linear 'scatternet' has no norm layers
  and ignores `norm` too (it must still be one of `NORMS`). `feature_norm` ('group_norm' or
  'data_norm') is the ScatterNets' normalisation of their features; `precomputed_features`
  makes them take their scattering features (cached by the caller) instead of images.
  """
  if arch not in ARCHITECTURES:
    raise ValueError(f'Unknown {arch=}; expected one of {tuple(ARCHITECTURES)}')
  kwargs = ({'grayscale': grayscale, 'feature_norm': feature_norm,
             'precomputed_features': precomputed_features}
            if arch in SCATTERNET_ARCHITECTURES else {})
  return ARCHITECTURES[arch](num_classes=num_classes, norm=check_norm(norm), dtype=dtype,
                             **kwargs)
