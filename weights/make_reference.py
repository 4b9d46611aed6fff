"""Regenerates the committed reference data in weights/reference/ with real torchvision.

Needs torch and torchvision, which dpjax itself never imports. Run it from the repo root
in a separate venv:

  python3 -m venv /work/torchvenv
  /work/torchvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy
  /work/torchvenv/bin/python -m weights.make_reference [--full_pth=/tmp/seeded_resnet18.pth]

Writes (all small; the tests read them without torch):
  resnet18_seed0.npz  images (NHWC) and torchvision resnet18 eval-mode logits for the
                      weights `weights.synthetic.seeded_state_dict(0)` (the test
                      regenerates those weights with NumPy).
  tiny_resnet.pth     torch.save of a tiny ResNet's state dict (real torch zip format).
  tiny_resnet_fp16.pth  the same state dict in float16.
  tiny_resnet.npz     images and eval-mode logits of that tiny ResNet, assembled from
                      torchvision's own BasicBlock.
  storage_views.pth   tensors that share one storage (offsets, strides) and several dtypes.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
import torch
from torch import nn
import torchvision
from torchvision.models import resnet as tv_resnet

from weights import synthetic

REFERENCE_DIR = pathlib.Path(__file__).resolve().parent / 'reference'


class TinyTorchResNet(nn.Module):
  """torchvision's ResNet forward with two stages of width 8 and 16 (one block each)."""

  def __init__(self, num_filters: int, num_classes: int):
    super().__init__()
    width1, width2 = num_filters, 2 * num_filters
    self.conv1 = nn.Conv2d(3, width1, kernel_size=7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(width1)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    self.layer1 = nn.Sequential(tv_resnet.BasicBlock(width1, width1))
    downsample = nn.Sequential(tv_resnet.conv1x1(width1, width2, 2), nn.BatchNorm2d(width2))
    self.layer2 = nn.Sequential(tv_resnet.BasicBlock(width1, width2, 2, downsample))
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(width2, num_classes)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer2(self.layer1(x))
    return self.fc(torch.flatten(self.avgpool(x), 1))


def _load_seeded(model: nn.Module, state: dict[str, np.ndarray]) -> None:
  expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  generated = {k: tuple(v.shape) for k, v in state.items()}
  if list(expected) != list(generated) or expected != generated:
    raise SystemExit(f'weights.synthetic layout differs from torch: {expected=} {generated=}')
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
  model.eval()


def _logits(model: nn.Module, images_nhwc: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
    return model(x).numpy().astype(np.float32)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--full_pth', help='also torch.save the seeded resnet18 here')
  args = parser.parse_args()
  torch.use_deterministic_algorithms(True)
  REFERENCE_DIR.mkdir(exist_ok=True)

  # Full ResNet-18: only images and logits are committed.
  resnet18 = torchvision.models.resnet18(weights=None)
  state = synthetic.seeded_state_dict(synthetic.RESNET18_REFERENCE_SEED)
  _load_seeded(resnet18, state)
  images = synthetic.seeded_images(*synthetic.RESNET18_REFERENCE_IMAGES)
  logits = _logits(resnet18, images)
  np.savez_compressed(REFERENCE_DIR / 'resnet18_seed0.npz', images=images, logits=logits)
  print(f'resnet18 logits: max |logit| {np.abs(logits).max():.3f}, std {logits.std():.3f}')
  if args.full_pth:
    torch.save(resnet18.state_dict(), args.full_pth)
    print(f'wrote {args.full_pth}')

  # Tiny ResNet: the real torch-written .pth is committed too.
  tiny = TinyTorchResNet(synthetic.TINY_NUM_FILTERS, synthetic.TINY_NUM_CLASSES)
  tiny_state = synthetic.seeded_state_dict(
      synthetic.TINY_REFERENCE_SEED, synthetic.TINY_STAGE_SIZES, synthetic.TINY_NUM_FILTERS,
      synthetic.TINY_NUM_CLASSES)
  _load_seeded(tiny, tiny_state)
  tiny_images = synthetic.seeded_images(*synthetic.TINY_REFERENCE_IMAGES)
  tiny_logits = _logits(tiny, tiny_images)
  np.savez_compressed(REFERENCE_DIR / 'tiny_resnet.npz', images=tiny_images, logits=tiny_logits)
  torch.save(tiny.state_dict(), REFERENCE_DIR / 'tiny_resnet.pth')
  half_state = {k: (v.half() if v.is_floating_point() else v) for k, v in tiny.state_dict().items()}
  torch.save(half_state, REFERENCE_DIR / 'tiny_resnet_fp16.pth')

  # Shared storages, offsets and strides, several dtypes; values known in closed form.
  base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
  torch.save({
      'base': base,
      'rows_1_to_2': base[1:],
      'transposed': base.t(),
      'column_2': base[:, 2],
      'int64': torch.arange(5, dtype=torch.int64),
      'float16': torch.tensor([0.5, -2.0, 1024.0], dtype=torch.float16),
      'bfloat16': torch.tensor([0.5, -2.0, 3.0], dtype=torch.bfloat16),
      'float64': torch.tensor([1.0 / 3.0], dtype=torch.float64),
      'scalar': torch.tensor(7.0),
  }, REFERENCE_DIR / 'storage_views.pth')
  for path in sorted(REFERENCE_DIR.iterdir()):
    print(f'{path.name}: {path.stat().st_size} bytes')


if __name__ == '__main__':
  main()
