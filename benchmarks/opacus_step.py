"""PyTorch reference rows for the benchmark: torchvision ResNet-18, plain and under Opacus.

torch, torchvision and opacus are imported inside the functions, so importing this module
costs nothing where they are absent; `missing_packages()` says which are missing so the
benchmark can skip these rows with a note instead of failing.

The model is what an Opacus user trains: torchvision's `resnet18` with BatchNorm replaced by
GroupNorm through `ModuleValidator.fix` (Opacus rejects BatchNorm), made private with
`PrivacyEngine.make_private` (per-example gradients by backward hooks, the default). Two
torchvision details clash with Opacus' hooks and are patched on this instance only: in-place
ReLU, and `out += identity` in `BasicBlock.forward` (both make Opacus raise "Output 0 of
BackwardHookFunction is a view and is being modified inplace").
"""

from __future__ import annotations

import importlib.util
import resource
import sys
import time
import types
from typing import Any

import numpy as np

TORCH_PACKAGES = ('torch', 'torchvision', 'opacus')


def missing_packages() -> list[str]:
  """The packages of TORCH_PACKAGES that cannot be imported here."""
  return [name for name in TORCH_PACKAGES if importlib.util.find_spec(name) is None]


def _basic_block_forward(self, x):
  """torchvision's BasicBlock.forward with an out-of-place residual sum (Opacus needs it)."""
  identity = x if self.downsample is None else self.downsample(x)
  out = self.relu(self.bn1(self.conv1(x)))
  out = self.bn2(self.conv2(out))
  return self.relu(out + identity)


def opacus_compatible_resnet18(num_classes: int):
  """torchvision resnet18 with GroupNorm (ModuleValidator.fix) and no in-place operations."""
  from opacus.validators import ModuleValidator
  from torch import nn
  from torchvision.models import resnet
  model = ModuleValidator.fix(resnet.resnet18(num_classes=num_classes))
  for module in model.modules():
    if isinstance(module, nn.ReLU):
      module.inplace = False
    if isinstance(module, resnet.BasicBlock):
      module.forward = types.MethodType(_basic_block_forward, module)
  errors = ModuleValidator.validate(model, strict=False)
  if errors:
    raise ValueError(f'Expected an Opacus-compatible ResNet-18, validator reports {errors}')
  return model


def _peak_memory(device) -> tuple[int, str]:
  import torch
  if device.type == 'cuda':
    return int(torch.cuda.max_memory_allocated(device)), 'torch.cuda.max_memory_allocated'
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'process_max_rss'


def _sync(device) -> None:
  import torch
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


def measure(*, private: bool, image_size: int, batch_size: int, num_classes: int, iters: int,
            warmup: int, l2_norm_clip: float = 1.0, noise_multiplier: float = 1.0,
            learning_rate: float = 0.01, seed: int = 0) -> dict[str, Any]:
  """Times `iters` SGD steps (after `warmup`) on one fixed random batch; median images/s.

  `private=True` is Opacus DP-SGD (clip each example's gradient to `l2_norm_clip`, add
  N(0, (noise_multiplier * l2_norm_clip)^2), divide by `batch_size`); `private=False` is the
  same GroupNorm model trained by plain SGD. Uses CUDA when torch sees a GPU, else the CPU.
  """
  import torch
  from torch import nn
  torch.manual_seed(seed)  # Benchmark weights and data only; nothing private here.
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)
  model = opacus_compatible_resnet18(num_classes).to(device)
  optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, weight_decay=1e-3)
  rng = np.random.default_rng(seed)
  images = torch.from_numpy(rng.standard_normal((batch_size, 3, image_size, image_size), np.float32))
  labels = torch.from_numpy(rng.integers(0, num_classes, batch_size))
  if private:
    from opacus import PrivacyEngine
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels),
                                         batch_size=batch_size)
    model, optimizer, _ = PrivacyEngine(accountant='rdp').make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=l2_norm_clip, poisson_sampling=False)
  images, labels = images.to(device), labels.to(device)
  criterion = nn.CrossEntropyLoss()
  model.train()

  def step() -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = criterion(model(images), labels)
    loss.backward()
    optimizer.step()
    return loss

  start = time.perf_counter()
  loss = step()
  _sync(device)
  first_step_s = time.perf_counter() - start
  for _ in range(max(0, warmup - 1)):
    step()
  _sync(device)
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    loss = step()
    _sync(device)
    times.append(time.perf_counter() - start)
  peak, memory_kind = _peak_memory(device)
  import opacus
  import torchvision
  device_name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
  return {'step_s': times, 'first_step_s': first_step_s, 'peak_memory_bytes': peak,
          'memory_kind': memory_kind, 'final_loss': float(loss), 'device': device_name,
          'platform': device.type, 'torch_threads': torch.get_num_threads(),
          'versions': {'torch': torch.__version__, 'torchvision': torchvision.__version__,
                       'opacus': opacus.__version__, 'python': sys.version.split()[0]}}
