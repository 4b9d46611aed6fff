"""Port of torchvision's ImageNet ResNet-18 weights to `dpjax.models.ResNet18`.

Reads torchvision `.pth` files (torch's zip serialisation) and `.safetensors` files
without importing torch or safetensors, maps every tensor by an explicit name table onto
the Flax variables `{'params', 'batch_stats'}`, checks every shape, and saves/loads the
result as an orbax checkpoint.

Safety: a `.pth` file holds a pickle, and unpickling can run arbitrary code. The reader
here admits only the globals that rebuild tensors (`torch._utils._rebuild_tensor_v2`,
`torch.<Type>Storage`, `collections.OrderedDict`) and replaces each with its own
NumPy implementation; any other global (e.g. `os.system` smuggled in through
`__reduce__`) stops loading with `UnsafePickleError` before anything is called.

Getting the real weights: `ensure_imagenet_checkpoint(cache_dir=...)` returns the converted
checkpoint, downloading torchvision's file (from $DPJAX_WEIGHTS_URL when set) and converting
it into `<cache_dir>/weights/` the first time; without internet it raises
`WeightsUnavailable`, saying which file to copy where. By hand: weights/README.md
(`python -m weights.fetch`, `python -m weights.convert`).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import http.client
import json
import math
import os
import pathlib
import pickle
import shutil
import struct
import sys
import tempfile
import time
import typing
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from dpjax.errors import UserInputError
from dpjax.models import resnet

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT_DIR = REPO_ROOT / 'weights' / 'resnet18_imagenet'
WEIGHTS_DIR_ENV = 'DPJAX_WEIGHTS_DIR'
WEIGHTS_URL_ENV = 'DPJAX_WEIGHTS_URL'
CACHE_SUBDIR = 'weights'  # ensure_imagenet_checkpoint keeps <cache_dir>/weights/{.pth, checkpoint}.
DEFAULT_DOWNLOAD_TIMEOUT_S = 60.0  # The longest wait for the connection or the next bytes.
# The whole download: $DPJAX_DOWNLOAD_DEADLINE_S, or this base plus the size at the rate below.
DOWNLOAD_DEADLINE_ENV = 'DPJAX_DOWNLOAD_DEADLINE_S'
DOWNLOAD_DEADLINE_BASE_S = 120.0
DOWNLOAD_MIN_RATE_BYTES_S = 200_000
TORCHVISION_RESNET18_BYTES = 46_830_571  # The size assumed before the server announces one.

TORCHVISION_RESNET18_FILENAME = 'resnet18-f37072fd.pth'
TORCHVISION_RESNET18_URL = 'https://download.pytorch.org/models/resnet18-f37072fd.pth'
# torchvision names its files <arch>-<first 8 hex digits of the file's sha256>.pth.
TORCHVISION_RESNET18_SHA256_PREFIX = 'f37072fd'
IMAGENET_NUM_CLASSES = 1000

Variables = dict[str, Any]


class WeightFileError(UserInputError):
  """A weight file is unreadable, corrupt, or does not fit the model."""


class UnsafePickleError(WeightFileError):
  """A .pth pickle asked for a global outside the tensor-rebuilding allowlist."""


# ---------------------------------------------------------------------------
# Reading torch's zip serialisation without torch.

_TORCH_STORAGE_DTYPES = {
    'FloatStorage': np.dtype(np.float32),
    'DoubleStorage': np.dtype(np.float64),
    'HalfStorage': np.dtype(np.float16),
    'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype(np.int64),
    'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16),
    'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8),
    'BoolStorage': np.dtype(np.bool_),
    # An untyped storage is raw bytes; torch reads it as uint8 too.
    'UntypedStorage': np.dtype(np.uint8),
}


class _StorageType(typing.NamedTuple):
  """Stands in for the `torch.<Type>Storage` class named in the pickle."""

  name: str
  dtype: np.dtype


class _Storage(typing.NamedTuple):
  """A storage record read from the archive, as a flat NumPy array."""

  key: str
  data: np.ndarray


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  """NumPy version of torch._utils._rebuild_tensor_v2: a strided view, copied out."""
  del requires_grad, backward_hooks, metadata  # Irrelevant for plain weights.
  if not isinstance(storage, _Storage):
    raise WeightFileError(f'Tensor storage is {type(storage).__name__}, not a storage record')
  size, stride = tuple(size), tuple(stride)
  if not all(isinstance(v, int) and v >= 0 for v in (storage_offset, *size, *stride)):
    raise WeightFileError(f'Invalid tensor layout {storage_offset=} {size=} {stride=}')
  if len(size) != len(stride):
    raise WeightFileError(f'Tensor layout has {len(size)} sizes but {len(stride)} strides')
  if math.prod(size) > 0:
    last_index = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last_index >= storage.data.size:
      raise WeightFileError(
          f'Tensor reaches element {last_index} of storage {storage.key!r}, which holds '
          f'{storage.data.size}: the file is corrupt or truncated')
  itemsize = storage.data.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage.data[storage_offset:] if size else storage.data[storage_offset:storage_offset + 1],
      shape=size,
      strides=tuple(s * itemsize for s in stride),
      writeable=False,
  )
  return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


# (module, name) -> what the restricted unpickler hands back instead of the real global.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    **{('torch', name): _StorageType(name, dtype) for name, dtype in _TORCH_STORAGE_DTYPES.items()},
    ('torch.storage', 'UntypedStorage'): _StorageType('UntypedStorage', np.dtype(np.uint8)),
}


class _TensorOnlyUnpickler(pickle.Unpickler):
  """Unpickler that can rebuild tensors and OrderedDicts and can call nothing else."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, path):
    super().__init__(file)
    self._archive = archive
    self._prefix = prefix
    self._byteorder = '<' if byteorder == 'little' else '>'
    self._path = path
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module, name):
    allowed = _ALLOWED_GLOBALS.get((module, name))
    if allowed is None:
      raise UnsafePickleError(
          f'{self._path}: refusing to load global {module}.{name}; only tensor data '
          f'(torch._utils._rebuild_tensor_v2, torch.*Storage, collections.OrderedDict) '
          f'is allowed, nothing was executed')
    return allowed

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
      raise UnsafePickleError(f'{self._path}: unsupported persistent id {pid!r:.100}')
    _, storage_type, key, _location, numel = pid
    if key not in self._storages:
      record = f'{self._prefix}data/{key}'
      try:
        raw = self._archive.read(record)
      except KeyError:
        raise WeightFileError(f'{self._path}: storage record {record!r} is missing') from None
      dtype = storage_type.dtype.newbyteorder(self._byteorder)
      if len(raw) % dtype.itemsize:
        raise WeightFileError(
            f'{self._path}: storage {record!r} has {len(raw)} bytes, not a multiple of '
            f'{dtype.itemsize} ({storage_type.name})')
      data = np.frombuffer(raw, dtype=dtype)
      if isinstance(numel, int) and data.size < numel and storage_type.name != 'UntypedStorage':
        raise WeightFileError(
            f'{self._path}: storage {record!r} holds {data.size} elements, expected {numel}')
      self._storages[key] = _Storage(key, data.astype(storage_type.dtype.newbyteorder('=')))
    return self._storages[key]


def _corrupt(path, error: Exception) -> WeightFileError:
  return WeightFileError(
      f'{path}: corrupt or truncated weight file ({type(error).__name__}: {error})')


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a `torch.save`d state dict (zip format) into NumPy arrays, without torch."""
  path = pathlib.Path(path)
  try:
    with open(path, 'rb') as f:
      magic = f.read(4)
    if magic[:2] == b'\x80\x02' or (magic and magic[0] == 0x80):
      raise WeightFileError(
          f'{path}: legacy (non-zip) torch serialisation is not supported; re-save it '
          f'with a current torch.save')
    with zipfile.ZipFile(path) as archive:
      pickles = [n for n in archive.namelist() if n.endswith('data.pkl') and n.count('/') == 1]
      if len(pickles) != 1:
        raise WeightFileError(
            f'{path}: expected one <name>/data.pkl record in the torch archive, found {pickles}')
      prefix = pickles[0][: -len('data.pkl')]
      byteorder = 'little'
      if f'{prefix}byteorder' in archive.namelist():
        byteorder = archive.read(f'{prefix}byteorder').decode('ascii').strip()
        if byteorder not in ('little', 'big'):
          raise WeightFileError(f'{path}: unknown {byteorder=}')
      with archive.open(pickles[0]) as pkl:
        state = _TensorOnlyUnpickler(pkl, archive, prefix, byteorder, path).load()
  except WeightFileError:
    raise
  except (zipfile.BadZipFile, zlib.error, EOFError, pickle.UnpicklingError, struct.error,
          ValueError, TypeError, IndexError, AttributeError) as error:
    raise _corrupt(path, error) from error
  if not isinstance(state, Mapping):
    raise WeightFileError(f'{path}: expected a state dict, found {type(state).__name__}')
  for key, value in state.items():
    if not isinstance(key, str) or not isinstance(value, np.ndarray):
      raise WeightFileError(
          f'{path}: expected a flat state dict of tensors, found {key!r}: {type(value).__name__}')
  return dict(state)


_SAFETENSORS_DTYPES = {
    'F64': np.dtype('<f8'),
    'F32': np.dtype('<f4'),
    'F16': np.dtype('<f2'),
    'BF16': np.dtype(ml_dtypes.bfloat16),
    'I64': np.dtype('<i8'),
    'I32': np.dtype('<i4'),
    'I16': np.dtype('<i2'),
    'I8': np.dtype('i1'),
    'U8': np.dtype('u1'),
    'BOOL': np.dtype(np.bool_),
}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a .safetensors file: u64 little-endian header size, JSON header, raw data."""
  path = pathlib.Path(path)
  blob = path.read_bytes()
  if len(blob) < 8:
    raise WeightFileError(f'{path}: truncated safetensors file ({len(blob)} bytes)')
  (header_size,) = struct.unpack('<Q', blob[:8])
  if header_size > len(blob) - 8:
    raise WeightFileError(
        f'{path}: truncated safetensors file (header claims {header_size} bytes, '
        f'file has {len(blob) - 8} after the size field)')
  try:
    header = json.loads(blob[8:8 + header_size])
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise _corrupt(path, error) from error
  if not isinstance(header, dict):
    raise WeightFileError(f'{path}: safetensors header is not a JSON object')
  body = memoryview(blob)[8 + header_size:]
  tensors = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    try:
      dtype = _SAFETENSORS_DTYPES[info['dtype']]
      shape = tuple(int(n) for n in info['shape'])
      begin, end = (int(n) for n in info['data_offsets'])
    except (KeyError, TypeError, ValueError) as error:
      raise WeightFileError(
          f'{path}: bad safetensors header entry for {name!r}: {info!r:.200}') from error
    if not 0 <= begin <= end <= len(body):
      raise WeightFileError(
          f'{path}: tensor {name!r} spans bytes [{begin}, {end}) but the data section has '
          f'{len(body)}: the file is truncated or corrupt')
    if end - begin != math.prod(shape) * dtype.itemsize:
      raise WeightFileError(
          f'{path}: tensor {name!r} has {end - begin} bytes, expected {shape} x {dtype.itemsize}')
    tensors[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape).copy()
  return tensors


RELEASE_MODEL_FILENAME = 'model.msgpack'  # What a finished run publishes in <workdir>/release/.


def _is_dpjax_release_model(path: pathlib.Path) -> bool:
  """Whether `path` is a model a dpjax run released: a Flax msgpack of {'params', ...}.

  (experiments/results.py `export_model` writes it as <workdir>/release/model.msgpack.)
  """
  try:
    with open(path, 'rb') as f:
      first = f.read(1)
    # A msgpack map starts with a fixmap byte (0x80-0x8f) or map16/map32 (0xde, 0xdf).
    if not first or not (0x80 <= first[0] <= 0x8f or first[0] in (0xde, 0xdf)):
      return False
    from flax import serialization  # Deferred: only for files that look like msgpack.
    restored = serialization.msgpack_restore(path.read_bytes())
  except Exception:  # pylint: disable=broad-except  (anything unreadable is not a release)
    return False
  return isinstance(restored, Mapping) and isinstance(restored.get('params'), Mapping)


def _release_model_error(path: pathlib.Path) -> WeightFileError:
  return WeightFileError(
      f'{path} is a dpjax release (a trained model: the Flax msgpack of its params and '
      f'batch_stats, as a finished run writes release/{RELEASE_MODEL_FILENAME}), not '
      f'pretrained backbone weights; --weights takes "imagenet", "none", a torchvision '
      f'.pth/.safetensors file or an orbax checkpoint directory (weights/README.md). To use '
      f'the release, restore it with flax.serialization.msgpack_restore and apply the model '
      f'to it; training on from it is not offered, as the privacy cost of the run that made '
      f'it would not be counted')


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a torch state dict from a .pth (zip) or .safetensors file.

  A dpjax release model file (msgpack) is recognised and refused with a WeightFileError
  saying what it is, instead of being called a corrupt weight file.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'Weight file {path} does not exist')
  if not zipfile.is_zipfile(path) and _is_dpjax_release_model(path):
    raise _release_model_error(path)
  if path.suffix == '.safetensors':
    return read_safetensors(path)
  return read_torch_state_dict(path)


# ---------------------------------------------------------------------------
# The explicit torchvision -> Flax name map.

CONV_OIHW_TO_HWIO = 'conv_oihw_to_hwio'
DENSE_OUT_IN_TO_IN_OUT = 'dense_out_in_to_in_out'
AS_IS = 'as_is'

_BN_TENSORS = (  # torch BatchNorm2d tensor -> (Flax collection, Flax variable)
    ('weight', 'params', 'scale'),
    ('bias', 'params', 'bias'),
    ('running_mean', 'batch_stats', 'mean'),
    ('running_var', 'batch_stats', 'var'),
)


class TensorMapping(typing.NamedTuple):
  torch_key: str
  collection: str
  flax_path: tuple[str, ...]
  torch_shape: tuple[int, ...]
  transform: str


def _arch_layout(arch: str) -> tuple[tuple[int, ...], int]:
  if arch not in resnet.ARCHITECTURES:
    raise ValueError(f'Unknown {arch=}; expected one of {tuple(resnet.ARCHITECTURES)}')
  keywords = resnet.ARCHITECTURES[arch].keywords
  return tuple(keywords['stage_sizes']), keywords['num_filters']


def torchvision_name_map(arch: str = 'resnet18',
                         num_classes: int = IMAGENET_NUM_CLASSES) -> list[TensorMapping]:
  """Every torchvision state-dict tensor of `arch` and where it goes in Flax."""
  stage_sizes, num_filters = _arch_layout(arch)
  table: list[TensorMapping] = []

  def conv(torch_prefix, flax_module, out_ch, in_ch, kernel):
    table.append(TensorMapping(f'{torch_prefix}.weight', 'params', (*flax_module, 'kernel'),
                               (out_ch, in_ch, kernel, kernel), CONV_OIHW_TO_HWIO))

  def batch_norm(torch_prefix, flax_module, channels):
    for torch_name, collection, flax_name in _BN_TENSORS:
      table.append(TensorMapping(f'{torch_prefix}.{torch_name}', collection,
                                 (*flax_module, flax_name), (channels,), AS_IS))

  conv('conv1', ('conv1',), num_filters, 3, 7)
  batch_norm('bn1', ('bn1',), num_filters)
  in_ch = num_filters
  for stage, num_blocks in enumerate(stage_sizes):
    out_ch = num_filters * 2**stage
    for block in range(num_blocks):
      torch_block, flax_block = f'layer{stage + 1}.{block}', f'layer{stage + 1}_{block}'
      conv(f'{torch_block}.conv1', (flax_block, 'conv1'), out_ch, in_ch, 3)
      batch_norm(f'{torch_block}.bn1', (flax_block, 'bn1'), out_ch)
      conv(f'{torch_block}.conv2', (flax_block, 'conv2'), out_ch, out_ch, 3)
      batch_norm(f'{torch_block}.bn2', (flax_block, 'bn2'), out_ch)
      if (stage > 0 and block == 0) or in_ch != out_ch:
        conv(f'{torch_block}.downsample.0', (flax_block, 'downsample_conv'), out_ch, in_ch, 1)
        batch_norm(f'{torch_block}.downsample.1', (flax_block, 'downsample_bn'), out_ch)
      in_ch = out_ch
  table.append(TensorMapping('fc.weight', 'params', ('fc', 'kernel'), (num_classes, in_ch),
                             DENSE_OUT_IN_TO_IN_OUT))
  table.append(TensorMapping('fc.bias', 'params', ('fc', 'bias'), (num_classes,), AS_IS))
  return table


def _batch_norm_prefixes(table: list[TensorMapping]) -> set[str]:
  return {m.torch_key.rsplit('.', 1)[0] for m in table if m.collection == 'batch_stats'}


def torchvision_to_flax(state_dict: Mapping[str, np.ndarray], *, arch: str = 'resnet18',
                        num_classes: int | None = IMAGENET_NUM_CLASSES,
                        source: str = 'state dict') -> Variables:
  """Maps a torchvision ResNet state dict onto Flax `{'params', 'batch_stats'}` (NumPy).

  `num_classes=None` takes the head size from `fc.weight`. Raises WeightFileError naming
  any missing or unexpected key and any tensor whose shape does not fit.
  """
  if num_classes is None:
    if 'fc.weight' not in state_dict or np.ndim(state_dict['fc.weight']) != 2:
      raise WeightFileError(f'{source}: cannot infer num_classes, fc.weight missing or not 2-D')
    num_classes = int(np.shape(state_dict['fc.weight'])[0])
  table = torchvision_name_map(arch, num_classes)
  ignored = {f'{prefix}.num_batches_tracked' for prefix in _batch_norm_prefixes(table)}
  expected = {m.torch_key for m in table}
  missing = sorted(expected - set(state_dict))
  unexpected = sorted(set(state_dict) - expected - ignored)
  if missing or unexpected:
    raise WeightFileError(
        f'{source}: does not match torchvision {arch}: missing keys {missing}, '
        f'unexpected keys {unexpected}')
  variables: Variables = {'params': {}, 'batch_stats': {}}
  for m in table:
    tensor = np.asarray(state_dict[m.torch_key])
    if tensor.shape != m.torch_shape:
      raise WeightFileError(
          f'{source}: {m.torch_key} has shape {tensor.shape}, expected {m.torch_shape} '
          f'for torchvision {arch} with {num_classes=}')
    if not np.issubdtype(tensor.dtype, np.floating) and tensor.dtype != ml_dtypes.bfloat16:
      raise WeightFileError(f'{source}: {m.torch_key} has non-float dtype {tensor.dtype}')
    tensor = tensor.astype(np.float32)
    if m.transform == CONV_OIHW_TO_HWIO:
      tensor = tensor.transpose(2, 3, 1, 0)
    elif m.transform == DENSE_OUT_IN_TO_IN_OUT:
      tensor = tensor.T
    node = variables[m.collection]
    for name in m.flax_path[:-1]:
      node = node.setdefault(name, {})
    node[m.flax_path[-1]] = np.ascontiguousarray(tensor)
  return variables


def load_torchvision(path: str | os.PathLike, *, arch: str = 'resnet18',
                     num_classes: int | None = IMAGENET_NUM_CLASSES) -> Variables:
  """Flax variables `{'params', 'batch_stats'}` for `ResNet18(num_classes)` from a file.

  Args:
    path: torchvision `.pth` (torch zip serialisation) or `.safetensors` state dict.
    arch: 'resnet18', or 'tiny' (the test model).
    num_classes: head size the file must have; None takes it from `fc.weight`.

  Returns:
    Nested dicts of float32 NumPy arrays: conv kernels HWIO, the fc kernel (in, out).
  """
  return torchvision_to_flax(read_state_dict(path), arch=arch, num_classes=num_classes,
                             source=str(path))


# ---------------------------------------------------------------------------
# Fine-tuning: a fresh head, and fitting loaded variables to a model.

def replace_head(variables: Variables, num_classes: int, key: jax.Array) -> Variables:
  """Same body, a freshly initialised `num_classes` head (torch Linear init, zero bias)."""
  fan_in = variables['params']['fc']['kernel'].shape[0]
  params = dict(variables['params'])
  params['fc'] = {
      'kernel': resnet.HEAD_KERNEL_INIT(key, (fan_in, num_classes), jnp.float32),
      'bias': resnet.HEAD_BIAS_INIT(key, (num_classes,), jnp.float32),
  }
  return {**variables, 'params': params}


def _model_arch(model: resnet.ResNet) -> str:
  for arch in resnet.ARCHITECTURES:
    stage_sizes, num_filters = _arch_layout(arch)
    if tuple(model.stage_sizes) == stage_sizes and model.num_filters == num_filters:
      return arch
  raise ValueError(
      f'No torchvision layout for ResNet(stage_sizes={model.stage_sizes}, '
      f'num_filters={model.num_filters})')


def _variable_shapes(model: nn.Module, input_shape) -> Variables:
  init = lambda key, x: model.init(key, x, train=False)
  images = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  return jax.eval_shape(init, jax.random.key(0), images)


def _shapes_by_path(tree) -> dict[str, tuple[int, ...]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): tuple(np.shape(leaf)) for path, leaf in leaves}


def _fit_to_model(variables: Variables, model: resnet.ResNet, key: jax.Array, input_shape,
                  source: str) -> tuple[Variables, list[str]]:
  """Replaces the head if its size differs and adapts the norm layers to `model.norm`."""
  target = _variable_shapes(model, input_shape)
  notes = []
  if variables['params']['fc']['kernel'].shape != target['params']['fc']['kernel'].shape:
    variables = replace_head(variables, model.num_classes, key)
    notes.append(f'new {model.num_classes}-class head')
  else:
    notes.append('pretrained head kept')
  if model.norm == resnet.GROUP_NORM:
    # BN statistics do not carry over to GroupNorm; like Opacus's BN->GN swap, keep the
    # convolutions and start the GroupNorm affine at identity.
    def reset_norm(path, leaf):
      names = [p.key for p in path]
      if any(n.startswith('bn') or n == 'downsample_bn' for n in names[:-1]):
        identity = 1.0 if names[-1] == 'scale' else 0.0
        return np.full(leaf.shape, identity, np.float32)
      return leaf
    variables = {'params': jax.tree_util.tree_map_with_path(reset_norm, variables['params'])}
    notes.append('GroupNorm affine reset to identity (BatchNorm statistics dropped)')
  elif 'batch_stats' not in variables:
    raise WeightFileError(f'{source}: has no batch_stats, which norm={model.norm!r} needs')
  variables = {k: variables[k] for k in target}
  got, want = _shapes_by_path(variables), _shapes_by_path(target)
  for name in sorted(set(got) | set(want)):
    if got.get(name) != want.get(name):
      raise WeightFileError(
          f'{source}: variable {name} has shape {got.get(name)}, the model expects '
          f'{want.get(name)} (None = absent)')
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), variables), notes


# ---------------------------------------------------------------------------
# Orbax checkpoints.

def _process_local_checkpointer():
  """A StandardCheckpointer that neither waits for nor writes with other JAX processes.

  These checkpoints hold host NumPy arrays that one process reads or writes on its own (one
  process of a multi-host job may convert the weights while the others wait on a file lock),
  so orbax's cross-process barriers must not run.
  """
  import orbax.checkpoint as ocp  # Deferred: slow import, only needed here.
  me = jax.process_index()
  return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}))


def save_checkpoint(variables: Variables, path: str | os.PathLike, *,
                    overwrite: bool = False) -> pathlib.Path:
  """Writes `variables` (any pytree of arrays) as an orbax checkpoint directory."""
  path = pathlib.Path(path).resolve()
  if path.exists() and not overwrite:
    raise FileExistsError(f'Checkpoint {path} already exists; pass overwrite=True to replace it')
  host_variables = jax.tree.map(np.asarray, variables)
  with _process_local_checkpointer() as checkpointer:
    checkpointer.save(path, host_variables, force=overwrite)
  return path


def load_checkpoint(path: str | os.PathLike) -> Variables:
  """Reads variables saved by `save_checkpoint` (as NumPy arrays)."""
  path = pathlib.Path(path).resolve()
  if not path.is_dir():
    raise FileNotFoundError(f'Checkpoint directory {path} does not exist')
  try:
    with _process_local_checkpointer() as checkpointer:
      restored = checkpointer.restore(path)
  except (FileNotFoundError, ValueError, KeyError, OSError) as error:
    raise WeightFileError(
        f'{path}: not a readable orbax checkpoint ({type(error).__name__}: {error})') from error
  return jax.tree.map(np.asarray, restored)


def imagenet_checkpoint_dir() -> pathlib.Path:
  """Where the converted ImageNet checkpoint lives: $DPJAX_WEIGHTS_DIR or the default.

  $DPJAX_WEIGHTS_DIR may name the checkpoint directory itself or a directory holding
  `resnet18_imagenet/`.
  """
  override = os.environ.get(WEIGHTS_DIR_ENV)
  if not override:
    return DEFAULT_CHECKPOINT_DIR
  override_dir = pathlib.Path(override).expanduser()
  nested = override_dir / DEFAULT_CHECKPOINT_DIR.name
  return nested if nested.is_dir() else override_dir


def imagenet_cache_dir(cache_dir: str | os.PathLike) -> pathlib.Path:
  """`<cache_dir>/weights`: where `ensure_imagenet_checkpoint` keeps the .pth and its checkpoint."""
  return pathlib.Path(cache_dir).expanduser().absolute() / CACHE_SUBDIR


def _is_checkpoint(path: pathlib.Path) -> bool:
  return path.is_dir() and any(path.iterdir())


def find_imagenet_checkpoint(cache_dir: str | os.PathLike | None = None) -> pathlib.Path | None:
  """The converted ImageNet checkpoint directory, or None when it has not been made.

  Looks at `imagenet_checkpoint_dir()` ($DPJAX_WEIGHTS_DIR or weights/resnet18_imagenet),
  then, when `cache_dir` is given, at `<cache_dir>/weights/resnet18_imagenet` (where
  `ensure_imagenet_checkpoint` puts it).
  """
  candidates = [imagenet_checkpoint_dir()]
  if cache_dir is not None:
    candidates.append(imagenet_cache_dir(cache_dir) / DEFAULT_CHECKPOINT_DIR.name)
  return next((path for path in candidates if _is_checkpoint(path)), None)


def sha256_of_file(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def check_sha256_prefix(path: str | os.PathLike,
                        prefix: str = TORCHVISION_RESNET18_SHA256_PREFIX) -> str:
  """Returns the file's sha256; raises WeightFileError unless it starts with `prefix`."""
  sha256 = sha256_of_file(path)
  if not sha256.startswith(prefix):
    raise WeightFileError(
        f'{path}: sha256 {sha256} does not start with {prefix} (torchvision '
        f'{TORCHVISION_RESNET18_FILENAME}); the file is a different or damaged download')
  return sha256


class Converted(typing.NamedTuple):
  """What `convert_torchvision_file` wrote."""

  path: pathlib.Path
  sha256: str
  num_params: int


def convert_torchvision_file(source: str | os.PathLike, out: str | os.PathLike, *,
                             arch: str = 'resnet18',
                             num_classes: int | None = IMAGENET_NUM_CLASSES,
                             sha256_prefix: str | None = TORCHVISION_RESNET18_SHA256_PREFIX,
                             overwrite: bool = False) -> Converted:
  """Converts a torchvision .pth / .safetensors file into an orbax checkpoint at `out`.

  The file's sha256 must start with `sha256_prefix` (None: no check). The checkpoint is
  written into a temporary folder beside `out` and renamed into place, so `out` is either
  absent or complete, whatever happens meanwhile. Raises FileNotFoundError (no `source`),
  FileExistsError (`out` exists and not `overwrite`) or WeightFileError.
  """
  source, out = pathlib.Path(source), pathlib.Path(out).expanduser().absolute()
  if not source.is_file():
    raise FileNotFoundError(f'{source} does not exist; see weights/README.md for how to get it')
  if out.exists() and not overwrite:
    raise FileExistsError(f'Checkpoint {out} already exists; pass overwrite=True to replace it')
  if sha256_prefix is None:
    sha256 = sha256_of_file(source)
  else:
    sha256 = check_sha256_prefix(source, sha256_prefix)
  variables = load_torchvision(source, arch=arch, num_classes=num_classes)
  num_params = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(variables['params']))
  out.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f'.{out.name}.tmp-', dir=out.parent))
  try:
    save_checkpoint(variables, staging / out.name)
    if out.exists():  # overwrite: move the old one aside; it is deleted with the staging folder.
      os.rename(out, staging / 'replaced')
    os.rename(staging / out.name, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return Converted(out, sha256, num_params)


# ---------------------------------------------------------------------------
# Downloading the ImageNet weights.

class WeightsUnavailable(WeightFileError):
  """The weights could not be downloaded: no connection, a timeout, or an HTTP error.

  Attributes: `url`, `reason` (one line), `destination` (the file the download was to write,
  where a copy of the file can be put by hand).
  """

  def __init__(self, url: str, reason: str, destination: pathlib.Path, advice: str):
    self.url, self.reason, self.destination = url, reason, destination
    super().__init__(f'could not download {url} ({reason}); {advice}')


_monotonic = time.monotonic  # Tests may replace it.


def imagenet_weights_url() -> str:
  """$DPJAX_WEIGHTS_URL (a mirror, a file:// URL or a local path) or torchvision's URL."""
  return os.environ.get(WEIGHTS_URL_ENV) or TORCHVISION_RESNET18_URL


def _as_url(url: str) -> str:
  if '://' in url:
    return url
  return pathlib.Path(url).expanduser().absolute().as_uri()  # A plain path.


def _failure_reason(error: BaseException, timeout_s: float) -> str:
  """One line saying why a transfer failed."""
  if isinstance(error, urllib.error.HTTPError):
    return f'HTTP {error.code} {error.reason}'
  if isinstance(error, urllib.error.URLError):
    if not isinstance(error.reason, BaseException):
      return str(error.reason)
    error = error.reason
  if isinstance(error, TimeoutError):  # socket.timeout is TimeoutError.
    return f'no response for {timeout_s:g} s'
  if isinstance(error, http.client.IncompleteRead):
    return 'connection closed before the end of the file'
  if isinstance(error, OSError) and error.strerror:
    return error.strerror  # E.g. 'Connection refused', 'Name or service not known'.
  return str(error) or type(error).__name__


# What a failing transfer raises: urllib's errors, http.client's (truncated responses),
# socket errors and timeouts (OSError), and ValueError for malformed URLs.
_TRANSFER_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError, ValueError)


def _offline_advice(destination: pathlib.Path) -> str:
  return (f'without internet, copy {TORCHVISION_RESNET18_FILENAME} to {destination} '
          f'(from a machine with internet, or from ~/.cache/torch/hub/checkpoints/)')


def download_deadline_s(expected_bytes: int | None = None) -> float:
  """How long a whole download may take: $DPJAX_DOWNLOAD_DEADLINE_S, or scaled to its size.

  Default: DOWNLOAD_DEADLINE_BASE_S plus the expected size at DOWNLOAD_MIN_RATE_BYTES_S
  (torchvision's 45 MiB ResNet-18 file: about 6 minutes). A download cut off by it keeps its
  .part file, and the next attempt continues from there.
  """
  override = os.environ.get(DOWNLOAD_DEADLINE_ENV)
  if override:
    try:
      value = float(override)
    except ValueError:
      value = math.nan
    if not (math.isfinite(value) and value > 0):
      raise UserInputError(f'${DOWNLOAD_DEADLINE_ENV}={override!r}: expected a number of '
                           f'seconds > 0')
    return value
  size = TORCHVISION_RESNET18_BYTES if expected_bytes is None else expected_bytes
  return DOWNLOAD_DEADLINE_BASE_S + size / DOWNLOAD_MIN_RATE_BYTES_S


def _set_read_timeout(response, seconds: float) -> None:
  """Best effort: the socket timeout of an http(s) response (a file:// one has none)."""
  sock = getattr(getattr(getattr(response, 'fp', None), 'raw', None), '_sock', None)
  if sock is not None and hasattr(sock, 'settimeout'):
    sock.settimeout(max(seconds, 0.001))


def _content_range_start(value: str | None) -> tuple[int, int | None] | None:
  """(first byte, total or None) of a `Content-Range: bytes a-b/total` header."""
  if not value or not value.startswith('bytes '):
    return None
  span, _, total = value[len('bytes '):].partition('/')
  first, _, _ = span.partition('-')
  if not first.strip().isdigit():
    return None
  return int(first), (int(total) if total.strip().isdigit() else None)


def download_file(url: str, destination: str | os.PathLike, *,
                  sha256_prefix: str = TORCHVISION_RESNET18_SHA256_PREFIX,
                  timeout_s: float = DEFAULT_DOWNLOAD_TIMEOUT_S,
                  deadline_s: float | None = None,
                  progress: bool = True) -> str:
  """Downloads `url` to `destination` through `<destination>.part`; returns its sha256.

  The file is renamed into place only when complete and its sha256 starts with
  `sha256_prefix`. A transfer that fails (no connection, silence, the deadline, a cut
  connection) keeps what arrived in the .part file, and the next call continues from there
  with an HTTP Range request; a server that ignores Range sends the whole file, which then
  replaces the .part. A resumed file whose sha256 is wrong is downloaded once more from the
  start; a fresh one with the wrong sha256 is deleted. `destination` is never touched unless
  the file is right.

  Args:
    url: http(s):// or file:// URL (a plain path is read as a file).
    destination: the file to write; its folder must exist.
    sha256_prefix: what the sha256 must start with.
    timeout_s: the longest wait for the connection or for the next bytes.
    deadline_s: the longest the whole download may take; None: `download_deadline_s()`
      ($DPJAX_DOWNLOAD_DEADLINE_S, or scaled to the size the server announces).
    progress: show a tqdm bar (bytes; the total from Content-Length) on stderr.

  Raises:
    WeightsUnavailable: no connection, a timeout, the deadline, an HTTP error, or a
      truncated transfer (the message says how much was kept for the next attempt).
    WeightFileError: the download's sha256 does not start with `sha256_prefix`.
  """
  import tqdm  # Deferred: only a download shows a progress bar.
  destination = pathlib.Path(destination)
  part = destination.with_name(destination.name + '.part')
  url = _as_url(url)
  start = _monotonic()
  explicit_deadline = deadline_s is not None or bool(os.environ.get(DOWNLOAD_DEADLINE_ENV))
  deadline = start + (deadline_s if deadline_s is not None else download_deadline_s())

  def unavailable(reason):
    kept = part.stat().st_size if part.exists() else 0
    if not kept:
      part.unlink(missing_ok=True)
    else:
      reason = (f'{reason}; {kept} bytes kept in {part}, the next attempt continues from '
                f'there')
    return WeightsUnavailable(url, reason, destination, _offline_advice(destination))

  def transfer(resume_from: int) -> None:
    """One request, appending to the .part from `resume_from` (0: a fresh file)."""
    nonlocal deadline
    request = urllib.request.Request(url)
    if resume_from and url.startswith(('http://', 'https://')):
      request.add_header('Range', f'bytes={resume_from}-')
    else:
      resume_from = 0
    try:
      response = urllib.request.urlopen(request, timeout=max(min(timeout_s, deadline - _monotonic()), 0.001))
    except urllib.error.HTTPError as error:
      if error.code == 416 and resume_from:  # The .part is not a prefix of this file.
        error.close()
        part.unlink(missing_ok=True)
        return transfer(0)
      raise unavailable(_failure_reason(error, timeout_s)) from error
    except _TRANSFER_ERRORS as error:
      raise unavailable(_failure_reason(error, timeout_s)) from error
    with response:
      length = response.headers.get('Content-Length')
      length = int(length) if length and length.isdigit() else None
      status = getattr(response, 'status', None) or response.getcode()
      content_range = _content_range_start(response.headers.get('Content-Range'))
      if resume_from and status == 206 and content_range and content_range[0] == resume_from:
        offset = resume_from
        total = content_range[1] or (None if length is None else offset + length)
      else:  # A fresh file, or a server that ignored Range (200): start again.
        offset, total = 0, length
      if not explicit_deadline and total is not None:
        deadline = start + download_deadline_s(total)
      received = offset
      read = getattr(response, 'read1', response.read)  # read1: returns what has arrived.
      with open(part, 'ab' if offset else 'wb') as f, tqdm.tqdm(
          total=total, initial=offset, unit='B', unit_scale=True, unit_divisor=1024,
          file=sys.stderr, desc=f'Downloading {destination.name}', disable=not progress) as bar:
        while True:
          left = deadline - _monotonic()
          if left <= 0:
            raise unavailable(f'not finished within the deadline of {deadline - start:g} s '
                              f'({received} of {total if total is not None else "?"} bytes; '
                              f'set ${DOWNLOAD_DEADLINE_ENV} to allow longer)')
          _set_read_timeout(response, min(timeout_s, left))
          try:
            chunk = read(1 << 20)
          except _TRANSFER_ERRORS as error:
            if isinstance(error, TimeoutError) and deadline - _monotonic() <= 0:
              continue  # Reported as the deadline above.
            raise unavailable(_failure_reason(error, timeout_s)) from error
          if not chunk:
            break
          f.write(chunk)
          received += len(chunk)
          bar.update(len(chunk))
    if total is not None and received != total:
      raise unavailable(f'connection closed before the end of the file ({received} of {total} bytes)')

  resumed = part.is_file() and part.stat().st_size > 0
  transfer(part.stat().st_size if resumed else 0)
  sha256 = sha256_of_file(part)
  if not sha256.startswith(sha256_prefix) and resumed:
    part.unlink()  # The kept part may belong to another file: once more from the start.
    transfer(0)
    sha256 = sha256_of_file(part)
  if not sha256.startswith(sha256_prefix):
    part.unlink(missing_ok=True)
    raise WeightFileError(
        f'{destination.name} downloaded from {url}: sha256 {sha256} does not start with '
        f'{sha256_prefix} (torchvision {TORCHVISION_RESNET18_FILENAME}); the download is a '
        f'different or damaged file and was deleted')
  os.replace(part, destination)
  return sha256


@contextlib.contextmanager
def _exclusive_lock(path: pathlib.Path, announce: bool):
  """Holds an exclusive flock on `path` (created if needed, never deleted) for the block."""
  import fcntl  # POSIX only; deferred so that importing dpjax.weights works everywhere.
  with open(path, 'a') as handle:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      if announce:
        print(f'Waiting for another process preparing the ImageNet weights (lock {path})',
              file=sys.stderr, flush=True)
      fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


def _torch_hub_copy(sha256_prefix: str) -> pathlib.Path | None:
  """torchvision's own cached copy of the file (`$TORCH_HOME/hub/checkpoints/`), if intact."""
  torch_home = os.environ.get('TORCH_HOME') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'torch')
  path = pathlib.Path(torch_home) / 'hub' / 'checkpoints' / TORCHVISION_RESNET18_FILENAME
  try:
    if path.is_file() and sha256_of_file(path).startswith(sha256_prefix):
      return path
  except OSError:
    pass
  return None


def ensure_imagenet_checkpoint(*, cache_dir: str | os.PathLike, url: str | None = None,
                               sha256_prefix: str = TORCHVISION_RESNET18_SHA256_PREFIX,
                               progress: bool = True,
                               timeout_s: float = DEFAULT_DOWNLOAD_TIMEOUT_S,
                               deadline_s: float | None = None) -> pathlib.Path:
  """The converted ImageNet ResNet-18 checkpoint, downloaded and converted if need be.

  Returns `find_imagenet_checkpoint(cache_dir)` when there is one. Otherwise, holding an
  exclusive lock `<cache_dir>/weights/resnet18_imagenet.lock` (so that the processes of a
  multi-host job sharing the cache download once; the others wait, then find it), converts
  `<cache_dir>/weights/resnet18-f37072fd.pth` (a copy put there by hand), torchvision's own
  cached copy, or else a fresh download of `url` into that file (through a .part file with a
  progress bar; see `download_file`), into `<cache_dir>/weights/resnet18_imagenet`, written
  atomically. Call it after `jax.distributed.initialize` (orbax starts the JAX backend).

  Args:
    cache_dir: the cache root (e.g. `dpjax.data.datasets.default_cache_root()`).
    url: where to download from; default $DPJAX_WEIGHTS_URL or torchvision's URL.
    sha256_prefix: what the file's sha256 must start with (torchvision's f37072fd).
    progress: show the download's progress bar (and a line when waiting for the lock).
    timeout_s: the longest wait for the connection or for the next bytes.
    deadline_s: the longest the whole download may take (None: `download_deadline_s`);
      a download cut off keeps its .part file, and the next call continues it.

  Raises:
    WeightsUnavailable: the download failed (no connection, timeout, deadline, HTTP error); the
      message names the URL, the reason, the file to copy and where.
    WeightFileError: a file with the wrong sha256 (a bad download is deleted; a copy put
      in the cache by hand is named and kept), one that does not convert, or a cache
      that cannot be written.
  """
  found = find_imagenet_checkpoint(cache_dir)
  if found is not None:
    return found
  folder = imagenet_cache_dir(cache_dir)
  try:
    folder.mkdir(parents=True, exist_ok=True)
    return _fetch_and_convert_locked(folder, url, sha256_prefix, progress, timeout_s, deadline_s)
  except OSError as error:  # The cache itself: unwritable, full, ...
    raise WeightFileError(
        f'cannot prepare the ImageNet weights in {folder} ({type(error).__name__}: {error})'
    ) from error


def _fetch_and_convert_locked(folder: pathlib.Path, url: str | None, sha256_prefix: str,
                              progress: bool, timeout_s: float,
                              deadline_s: float | None = None) -> pathlib.Path:
  checkpoint = folder / DEFAULT_CHECKPOINT_DIR.name
  pth = folder / TORCHVISION_RESNET18_FILENAME
  with _exclusive_lock(folder / f'{checkpoint.name}.lock', announce=progress):
    if _is_checkpoint(checkpoint):  # Another process made it while this one waited.
      return checkpoint
    if checkpoint.is_dir():
      checkpoint.rmdir()  # Empty: not a checkpoint, and in the way of the rename.
    if pth.is_file():  # Put there by hand, or downloaded by an earlier call.
      try:
        check_sha256_prefix(pth, sha256_prefix)
      except WeightFileError as error:
        raise WeightFileError(f'{error}; delete it or replace it with torchvision\'s '
                              f'{TORCHVISION_RESNET18_FILENAME}') from None
      source = pth
    else:
      source = _torch_hub_copy(sha256_prefix)
    if source is None:
      download_url = _as_url(url or imagenet_weights_url())
      try:
        download_file(download_url, pth, sha256_prefix=sha256_prefix, timeout_s=timeout_s,
                      deadline_s=deadline_s, progress=progress)
      except WeightsUnavailable as error:
        raise WeightsUnavailable(
            error.url, error.reason, pth,
            f'without internet, copy {TORCHVISION_RESNET18_FILENAME} (from a machine with '
            f'internet, or from ~/.cache/torch/hub/checkpoints/) to {pth}, where it is '
            f'converted on first use, or convert it yourself: python -m weights.convert '
            f'--pth=PATH/{TORCHVISION_RESNET18_FILENAME}') from error.__cause__
      source = pth
    # The sha256 prefix was checked above (or by download_file).
    convert_torchvision_file(source, checkpoint, sha256_prefix=None)
  return checkpoint


# ---------------------------------------------------------------------------
# What the trainer calls.

@functools.partial(jax.jit, static_argnames=('model', 'input_shape'))
def _init_jitted(model: nn.Module, key: jax.Array, input_shape) -> Variables:
  # Jitted: an un-jitted init compiles every op on its own, which is slow on CPU.
  return model.init(key, jnp.zeros(input_shape, jnp.float32), train=False)


def _fresh_variables(model: nn.Module, key: jax.Array, input_shape) -> Variables:
  return _init_jitted(model, key, tuple(int(n) for n in input_shape))


def load_pretrained(spec: str | os.PathLike | None, model: resnet.ResNet, num_classes: int,
                    key: jax.Array, input_shape, *,
                    cache_dir: str | os.PathLike | None = None) -> tuple[Variables, bool, str]:
  """Initial variables for `model`, from pretrained weights when available.

  Args:
    spec: 'imagenet' (the converted checkpoint, see `find_imagenet_checkpoint`), 'none',
      or a path to a torchvision .pth / .safetensors file or an orbax checkpoint dir.
    model: the ResNet to initialise; its `num_classes` must equal `num_classes`.
    num_classes: classes of the task; a head of another size is replaced by a fresh one.
    key: JAX key for the fresh initialisation or the fresh head.
    input_shape: NHWC shape used to initialise (batch size irrelevant).
    cache_dir: for 'imagenet', also look for the checkpoint `ensure_imagenet_checkpoint`
      puts in `<cache_dir>/weights/` (None: only $DPJAX_WEIGHTS_DIR or weights/).

  Returns:
    (variables, pretrained, description). For 'imagenet' with no converted checkpoint,
    freshly initialised variables, pretrained=False and a description saying so.
  """
  if model.num_classes != num_classes:
    raise ValueError(f'Expected model.num_classes={model.num_classes} == {num_classes=}')
  spec_text = 'none' if spec is None else str(spec)
  if spec_text == 'none':
    description = 'random initialisation (no pretrained weights)'
    return _fresh_variables(model, key, input_shape), False, description
  if spec_text == 'imagenet':
    path = find_imagenet_checkpoint(cache_dir)
    if path is None:
      searched = [imagenet_checkpoint_dir()]
      if cache_dir is not None:
        searched.append(imagenet_cache_dir(cache_dir) / DEFAULT_CHECKPOINT_DIR.name)
      description = (
          f'ImageNet weights not found at {" or ".join(map(str, searched))}; training from '
          f'scratch (random initialisation). See weights/README.md to convert '
          f'{TORCHVISION_RESNET18_FILENAME}.')
      return _fresh_variables(model, key, input_shape), False, description
    source = f'ImageNet (torchvision {TORCHVISION_RESNET18_FILENAME}) from {path}'
  else:
    path = pathlib.Path(spec_text).expanduser()
    if not path.exists():
      raise FileNotFoundError(
          f'Pretrained weights {spec_text!r} not found; expected "imagenet", "none", a '
          f'.pth/.safetensors file or an orbax checkpoint directory')
    source = str(path)
  if path.is_dir():
    release_model = path / RELEASE_MODEL_FILENAME
    if (release_model.is_file() and not (path / '_CHECKPOINT_METADATA').exists()
        and _is_dpjax_release_model(release_model)):
      raise _release_model_error(release_model)
    loaded = load_checkpoint(path)
  else:
    loaded = load_torchvision(path, arch=_model_arch(model), num_classes=None)
  variables, notes = _fit_to_model(loaded, model, key, input_shape, str(path))
  return variables, True, f'{source}; {", ".join(notes)}'
