"""Seeded stand-in weights in torchvision's ResNet state-dict layout (NumPy only).

Both `weights/make_reference.py` (which runs them through torchvision, in a separate
venv with torch) and the dpjax tests (which run them through the Flax model, without
torch) build the same arrays from the same seed, so the committed reference logits can
be checked without committing 45 MB of weights. This module must not import torch or jax.

The key list here is written independently of `dpjax.weights`'s name map;
make_reference.py checks it against torchvision's own `resnet18().state_dict()`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESNET18_STAGE_SIZES = (2, 2, 2, 2)
TINY_STAGE_SIZES = (1, 1)
TINY_NUM_FILTERS = 8
TINY_NUM_CLASSES = 10
# Seeds of the committed reference data (weights/reference/, see make_reference.py).
RESNET18_REFERENCE_SEED = 0
RESNET18_REFERENCE_IMAGES = (RESNET18_REFERENCE_SEED + 100, (2, 64, 64, 3))
TINY_REFERENCE_SEED = 1
TINY_REFERENCE_IMAGES = (TINY_REFERENCE_SEED + 100, (2, 32, 32, 3))
# Value stored in every num_batches_tracked buffer (torch keeps it; the port ignores it).
NUM_BATCHES_TRACKED = 1234


def torchvision_resnet_shapes(
    stage_sizes: Sequence[int] = RESNET18_STAGE_SIZES,
    num_filters: int = 64,
    num_classes: int = 1000,
) -> dict[str, tuple[int, ...]]:
  """torchvision state-dict keys (in torch's order) and shapes for a BasicBlock ResNet."""
  shapes: dict[str, tuple[int, ...]] = {}

  def add_bn(prefix: str, channels: int) -> None:
    for name in ('weight', 'bias', 'running_mean', 'running_var'):
      shapes[f'{prefix}.{name}'] = (channels,)
    shapes[f'{prefix}.num_batches_tracked'] = ()

  shapes['conv1.weight'] = (num_filters, 3, 7, 7)
  add_bn('bn1', num_filters)
  in_channels = num_filters
  for stage, num_blocks in enumerate(stage_sizes):
    channels = num_filters * 2**stage
    for block in range(num_blocks):
      prefix = f'layer{stage + 1}.{block}'
      stride = 2 if stage > 0 and block == 0 else 1
      shapes[f'{prefix}.conv1.weight'] = (channels, in_channels, 3, 3)
      add_bn(f'{prefix}.bn1', channels)
      shapes[f'{prefix}.conv2.weight'] = (channels, channels, 3, 3)
      add_bn(f'{prefix}.bn2', channels)
      if stride != 1 or in_channels != channels:
        shapes[f'{prefix}.downsample.0.weight'] = (channels, in_channels, 1, 1)
        add_bn(f'{prefix}.downsample.1', channels)
      in_channels = channels
  shapes['fc.weight'] = (num_classes, in_channels)
  shapes['fc.bias'] = (num_classes,)
  return shapes


def seeded_state_dict(
    seed: int,
    stage_sizes: Sequence[int] = RESNET18_STAGE_SIZES,
    num_filters: int = 64,
    num_classes: int = 1000,
) -> dict[str, np.ndarray]:
  """Random weights with non-trivial BatchNorm statistics, reproducible from `seed`.

  Convolutions are He-scaled so activations stay O(1) through the network; BN running
  means/variances are far from 0/1 so that using batch statistics instead of running
  ones, or a wrong epsilon, shows in the logits.
  """
  rng = np.random.default_rng(seed)
  state: dict[str, np.ndarray] = {}
  for key, shape in torchvision_resnet_shapes(stage_sizes, num_filters, num_classes).items():
    kind = key.rsplit('.', 1)[1]
    if kind == 'num_batches_tracked':
      state[key] = np.array(NUM_BATCHES_TRACKED, dtype=np.int64)
    elif key == 'fc.weight':
      state[key] = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[1]))
    elif key == 'fc.bias':
      state[key] = 0.1 * rng.standard_normal(shape, dtype=np.float32)
    elif len(shape) == 4:  # conv weight, OIHW
      fan_in = shape[1] * shape[2] * shape[3]
      state[key] = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    elif kind == 'weight':
      state[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    elif kind == 'bias':
      state[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    elif kind == 'running_mean':
      state[key] = (0.3 * rng.standard_normal(shape)).astype(np.float32)
    elif kind == 'running_var':
      state[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    else:
      raise ValueError(f'No generator for {key=}')
  return state


def seeded_images(seed: int, shape_nhwc: tuple[int, int, int, int]) -> np.ndarray:
  """Standard-normal float32 images, roughly like ImageNet-normalised inputs."""
  return np.random.default_rng(seed).standard_normal(shape_nhwc, dtype=np.float32)
