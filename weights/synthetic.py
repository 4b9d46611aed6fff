"""Seeded stand-in weights in torchvision's ResNet state-dict layout (NumPy only).

Both `weights/make_reference.py` (which runs them through torchvision, in a separate
venv with torch) and the dpjax tests (which run them through the Flax model, without
torch) build the same arrays from the same seed, so the committed reference logits can
be checked without committing 45 MB of weights. This module must not import torch or jax.

`write_torch_pth` writes a state dict in torch's zip serialisation (what `torch.save`
writes for a dict of contiguous tensors), so tests can produce ResNet-18-shaped `.pth`
files, e.g. to serve as a stand-in download, without torch.

The key list here is written independently of `dpjax.weights`'s name map;
make_reference.py checks it against torchvision's own `resnet18().state_dict()`.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from collections.abc import Mapping, Sequence

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


# numpy dtype -> the torch storage class a torch.save pickle names for it.
_TORCH_STORAGE_NAMES = {
    np.dtype(np.float32): 'FloatStorage',
    np.dtype(np.float64): 'DoubleStorage',
    np.dtype(np.float16): 'HalfStorage',
    np.dtype(np.int64): 'LongStorage',
    np.dtype(np.int32): 'IntStorage',
    np.dtype(np.uint8): 'ByteStorage',
    np.dtype(np.bool_): 'BoolStorage',
}


def _pickle_int(value: int) -> bytes:
  return pickle.BININT + struct.pack('<i', value)


def _pickle_str(text: str) -> bytes:
  raw = text.encode('utf-8')
  return pickle.BINUNICODE + struct.pack('<I', len(raw)) + raw


def _pickle_global(module: str, name: str) -> bytes:
  return pickle.GLOBAL + f'{module}\n{name}\n'.encode('ascii')


def _pickle_int_tuple(values: Sequence[int]) -> bytes:
  return pickle.MARK + b''.join(_pickle_int(int(v)) for v in values) + pickle.TUPLE


def write_torch_pth(path, state_dict: Mapping[str, np.ndarray], *, archive_name: str = 'archive') -> None:
  """Writes `state_dict` the way `torch.save(state_dict, path)` does (zip, protocol 2 pickle).

  Each array gets its own little-endian storage record `<archive_name>/data/<i>`; the pickle
  is an OrderedDict of `torch._utils._rebuild_tensor_v2(storage, 0, shape, strides, False,
  OrderedDict())` calls, exactly the globals torch emits. Deterministic: the same dict gives
  the same bytes.
  """
  empty_ordered_dict = _pickle_global('collections', 'OrderedDict') + pickle.EMPTY_TUPLE + pickle.REDUCE
  body = [pickle.PROTO + bytes([2]), empty_ordered_dict, pickle.MARK]
  records = {}
  for index, (key, value) in enumerate(state_dict.items()):
    array = np.array(value, order='C')  # ascontiguousarray would make a scalar 1-D.
    storage_name = _TORCH_STORAGE_NAMES[array.dtype]
    shape = array.shape
    strides = [int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape))]
    persistent_id = (pickle.MARK + _pickle_str('storage') + _pickle_global('torch', storage_name)
                     + _pickle_str(str(index)) + _pickle_str('cpu') + _pickle_int(array.size)
                     + pickle.TUPLE + pickle.BINPERSID)
    body += [_pickle_str(key), _pickle_global('torch._utils', '_rebuild_tensor_v2'), pickle.MARK,
             persistent_id, _pickle_int(0), _pickle_int_tuple(shape), _pickle_int_tuple(strides),
             pickle.NEWFALSE, empty_ordered_dict, pickle.TUPLE, pickle.REDUCE]
    records[f'{archive_name}/data/{index}'] = array.astype(array.dtype.newbyteorder('<')).tobytes()
  body += [pickle.SETITEMS, pickle.STOP]
  fixed_time = (1980, 1, 1, 0, 0, 0)
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as archive:
    def write(name, data):
      archive.writestr(zipfile.ZipInfo(name, fixed_time), data)
    write(f'{archive_name}/data.pkl', b''.join(body))
    write(f'{archive_name}/byteorder', b'little')
    for name, data in records.items():
      write(name, data)
    write(f'{archive_name}/version', b'3\n')
