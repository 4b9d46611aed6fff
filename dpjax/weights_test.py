"""Tests for dpjax.weights and the weights/ scripts.

Reference data in weights/reference/ was written once by real torch/torchvision
(weights/make_reference.py); the weights themselves are regenerated here from a seed with
NumPy (weights/synthetic.py), so torch is never imported.
"""

import functools
import json
import os
import pathlib
import pickle
import struct
import urllib.error
import urllib.request
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from dpjax import models
from dpjax import weights
from weights import convert
from weights import fetch
from weights import synthetic

REFERENCE_DIR = pathlib.Path(__file__).resolve().parent.parent / 'weights' / 'reference'
TINY_PTH = REFERENCE_DIR / 'tiny_resnet.pth'


def _tiny_state_dict():
  return synthetic.seeded_state_dict(synthetic.TINY_REFERENCE_SEED, synthetic.TINY_STAGE_SIZES,
                                     synthetic.TINY_NUM_FILTERS, synthetic.TINY_NUM_CLASSES)


def _assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def _shapes(tree):
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves}


@functools.partial(jax.jit, static_argnames='model')
def _eval_logits(model, variables, images):
  return model.apply(variables, images, train=False)


_SAFETENSORS_CODES = {np.dtype(np.float32): 'F32', np.dtype(np.float16): 'F16',
                      np.dtype(np.int64): 'I64'}


def _write_safetensors(path, tensors):
  """Minimal safetensors writer: u64 LE header size, JSON header, raw LE bytes."""
  header, chunks, offset = {'__metadata__': {'format': 'pt'}}, [], 0
  for name, array in tensors.items():
    raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder('<')).tobytes()
    header[name] = {'dtype': _SAFETENSORS_CODES[array.dtype], 'shape': list(array.shape),
                    'data_offsets': [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  header_bytes = json.dumps(header).encode()
  header_bytes += b' ' * (-len(header_bytes) % 8)
  pathlib.Path(path).write_bytes(struct.pack('<Q', len(header_bytes)) + header_bytes + b''.join(chunks))


# --- name map ----------------------------------------------------------------------------


@pytest.mark.parametrize('arch, num_classes', [('resnet18', 1000), ('tiny', 10)])
def test_name_map_covers_torchvision_layout_and_fits_the_flax_model(arch, num_classes):
  stage_sizes, num_filters = weights._arch_layout(arch)
  torch_shapes = synthetic.torchvision_resnet_shapes(stage_sizes, num_filters, num_classes)
  table = weights.torchvision_name_map(arch, num_classes)
  # Every torchvision tensor except the ignored BN step counters is mapped, with its shape.
  assert {m.torch_key: m.torch_shape for m in table} == {
      k: v for k, v in torch_shapes.items() if not k.endswith('num_batches_tracked')}
  model = models.create_model(num_classes, arch=arch)
  flax_shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                               jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  converted = weights.torchvision_to_flax(
      synthetic.seeded_state_dict(0, stage_sizes, num_filters, num_classes), arch=arch,
      num_classes=num_classes)
  assert _shapes(converted) == _shapes(flax_shapes)


def test_layouts_are_transposed_oihw_to_hwio_and_out_in_to_in_out():
  state = _tiny_state_dict()
  variables = weights.torchvision_to_flax(state, arch='tiny', num_classes=10)
  conv = state['layer2.0.conv1.weight']  # (out=16, in=8, 3, 3)
  np.testing.assert_array_equal(variables['params']['layer2_0']['conv1']['kernel'][2, 1, 5, 7],
                                conv[7, 5, 2, 1])
  np.testing.assert_array_equal(variables['params']['fc']['kernel'], state['fc.weight'].T)
  np.testing.assert_array_equal(variables['batch_stats']['layer2_0']['downsample_bn']['var'],
                                state['layer2.0.downsample.1.running_var'])
  np.testing.assert_array_equal(variables['params']['bn1']['scale'], state['bn1.weight'])


# --- numerical equivalence with torchvision -------------------------------------------------


def test_resnet18_logits_match_torchvision():
  reference = np.load(REFERENCE_DIR / 'resnet18_seed0.npz')
  variables = weights.torchvision_to_flax(
      synthetic.seeded_state_dict(synthetic.RESNET18_REFERENCE_SEED))
  images = synthetic.seeded_images(*synthetic.RESNET18_REFERENCE_IMAGES)
  np.testing.assert_array_equal(images, reference['images'])
  logits = _eval_logits(models.ResNet18(num_classes=1000), variables, images)
  scale = np.abs(reference['logits']).max()
  assert scale > 1.0
  assert np.abs(np.asarray(logits) - reference['logits']).max() <= 1e-4 * scale


def test_real_torch_file_of_tiny_resnet_loads_exactly_and_matches_torch_logits():
  variables = weights.load_torchvision(TINY_PTH, arch='tiny', num_classes=10)
  expected = weights.torchvision_to_flax(_tiny_state_dict(), arch='tiny', num_classes=10)
  _assert_trees_equal(variables, expected)
  reference = np.load(REFERENCE_DIR / 'tiny_resnet.npz')
  for norm in ('frozen_bn', 'batch_norm'):
    logits = _eval_logits(models.ResNetTiny(num_classes=10, norm=norm), variables,
                          reference['images'])
    scale = np.abs(reference['logits']).max()
    assert np.abs(np.asarray(logits) - reference['logits']).max() <= 1e-4 * scale


def test_half_precision_torch_file_is_widened_to_float32():
  variables = weights.load_torchvision(REFERENCE_DIR / 'tiny_resnet_fp16.pth', arch='tiny',
                                       num_classes=10)
  expected = jax.tree.map(lambda x: x.astype(np.float16).astype(np.float32),
                          weights.torchvision_to_flax(_tiny_state_dict(), arch='tiny', num_classes=10))
  _assert_trees_equal(variables, expected)
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(variables))


def test_shared_storages_offsets_strides_and_dtypes_are_rebuilt():
  tensors = weights.read_torch_state_dict(REFERENCE_DIR / 'storage_views.pth')
  base = np.arange(12, dtype=np.float32).reshape(3, 4)
  np.testing.assert_array_equal(tensors['base'], base)
  np.testing.assert_array_equal(tensors['rows_1_to_2'], base[1:])
  np.testing.assert_array_equal(tensors['transposed'], base.T)
  np.testing.assert_array_equal(tensors['column_2'], base[:, 2])
  np.testing.assert_array_equal(tensors['int64'], np.arange(5))
  assert tensors['int64'].dtype == np.int64
  np.testing.assert_array_equal(tensors['float16'], np.array([0.5, -2.0, 1024.0], np.float16))
  np.testing.assert_array_equal(tensors['bfloat16'].astype(np.float32), [0.5, -2.0, 3.0])
  assert tensors['float64'].dtype == np.float64 and tensors['float64'][0] == 1.0 / 3.0
  assert tensors['scalar'].shape == () and tensors['scalar'] == 7.0


def test_safetensors_round_trip_equals_the_torch_file(tmp_path):
  path = tmp_path / 'tiny.safetensors'
  state = _tiny_state_dict()
  _write_safetensors(path, state)
  _assert_trees_equal(weights.read_safetensors(path), state)
  _assert_trees_equal(weights.load_torchvision(path, arch='tiny', num_classes=None),
                      weights.load_torchvision(TINY_PTH, arch='tiny', num_classes=10))


# --- refusing bad files -------------------------------------------------------------------


class _OpensAFile:
  def __init__(self, path):
    self.path = str(path)

  def __reduce__(self):
    return (open, (self.path, 'w'))


class _RunsAShellCommand:
  def __init__(self, path):
    self.path = str(path)

  def __reduce__(self):
    return (os.system, (f'touch {self.path}',))


def _torch_like_zip(path, payload: bytes):
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('evil/data.pkl', payload)
    archive.writestr('evil/byteorder', 'little')


@pytest.mark.parametrize('attack, refused_global', [(_OpensAFile, r'global io\.open'),
                                                    (_RunsAShellCommand, r'global (posix|nt|os)\.system')])
def test_pickle_that_calls_code_is_refused_and_runs_nothing(tmp_path, attack, refused_global):
  marker = tmp_path / 'pwned'
  evil = tmp_path / 'evil.pth'
  _torch_like_zip(evil, pickle.dumps({'conv1.weight': attack(marker)}, protocol=2))
  with pytest.raises(weights.UnsafePickleError, match=refused_global) as error:
    weights.load_torchvision(evil)
  assert str(evil) in str(error.value)
  assert not marker.exists()


def test_legacy_non_zip_pickle_is_refused_without_unpickling(tmp_path):
  marker = tmp_path / 'pwned'
  legacy = tmp_path / 'legacy.pth'
  legacy.write_bytes(pickle.dumps(_OpensAFile(marker), protocol=2))
  with pytest.raises(weights.WeightFileError, match='legacy'):
    weights.load_torchvision(legacy)
  assert not marker.exists()


def test_truncated_or_corrupt_files_give_an_error_naming_the_file(tmp_path):
  blob = TINY_PTH.read_bytes()
  truncated = tmp_path / 'truncated.pth'
  truncated.write_bytes(blob[: len(blob) // 2])
  with pytest.raises(weights.WeightFileError, match='truncated') as error:
    weights.load_torchvision(truncated, arch='tiny', num_classes=10)
  assert str(truncated) in str(error.value)

  # A flipped byte inside a stored tensor fails the zip CRC.
  with zipfile.ZipFile(TINY_PTH) as archive:
    info = archive.getinfo('tiny_resnet/data/0')
  corrupt = tmp_path / 'corrupt.pth'
  damaged = bytearray(blob)
  damaged[info.header_offset + 200] ^= 0xFF
  corrupt.write_bytes(bytes(damaged))
  with pytest.raises(weights.WeightFileError, match='corrupt') as error:
    weights.load_torchvision(corrupt, arch='tiny', num_classes=10)
  assert str(corrupt) in str(error.value)

  safetensors = tmp_path / 'tiny.safetensors'
  _write_safetensors(safetensors, _tiny_state_dict())
  safetensors.write_bytes(safetensors.read_bytes()[:-1000])
  with pytest.raises(weights.WeightFileError, match='truncated') as error:
    weights.load_torchvision(safetensors, arch='tiny', num_classes=10)
  assert str(safetensors) in str(error.value)


def test_missing_and_unexpected_keys_are_named(tmp_path):
  state = _tiny_state_dict()
  del state['layer1.0.bn1.running_var']
  state['layer9.0.conv1.weight'] = np.zeros((1,), np.float32)
  state['fc.num_batches_tracked'] = np.array(0)  # Only BN step counters are ignored.
  path = tmp_path / 'wrong_keys.safetensors'
  _write_safetensors(path, state)
  with pytest.raises(weights.WeightFileError) as error:
    weights.load_torchvision(path, arch='tiny', num_classes=10)
  message = str(error.value)
  assert "missing keys ['layer1.0.bn1.running_var']" in message
  assert "unexpected keys ['fc.num_batches_tracked', 'layer9.0.conv1.weight']" in message
  assert str(path) in message


def test_shape_mismatch_names_the_key():
  state = _tiny_state_dict()
  state['layer2.0.downsample.0.weight'] = np.zeros((16, 8, 3, 3), np.float32)
  with pytest.raises(weights.WeightFileError,
                     match=r'layer2\.0\.downsample\.0\.weight has shape \(16, 8, 3, 3\), expected \(16, 8, 1, 1\)'):
    weights.torchvision_to_flax(state, arch='tiny', num_classes=10)
  with pytest.raises(weights.WeightFileError, match=r'fc\.weight has shape \(10, 16\), expected \(1000, 16\)'):
    weights.torchvision_to_flax(_tiny_state_dict(), arch='tiny')


# --- fine-tuning head ---------------------------------------------------------------------


def test_replace_head_keeps_the_body_and_draws_a_torch_linear_init():
  variables = weights.torchvision_to_flax(synthetic.seeded_state_dict(0))
  new = weights.replace_head(variables, num_classes=100, key=jax.random.key(3))
  body = lambda v: {**v, 'params': {k: x for k, x in v['params'].items() if k != 'fc'}}
  _assert_trees_equal(body(new), body(variables))
  kernel, bias = np.asarray(new['params']['fc']['kernel']), np.asarray(new['params']['fc']['bias'])
  assert kernel.shape == (512, 100) and bias.shape == (100,)
  np.testing.assert_array_equal(bias, 0.0)
  # torch.nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); reject a bound 1.5x off.
  bound = 1.0 / np.sqrt(512)
  assert scipy.stats.kstest(kernel.ravel(), scipy.stats.uniform(-bound, 2 * bound).cdf).pvalue > 1e-3
  wide = 1.5 * bound
  assert scipy.stats.kstest(kernel.ravel(), scipy.stats.uniform(-wide, 2 * wide).cdf).pvalue < 1e-6
  other = weights.replace_head(variables, num_classes=100, key=jax.random.key(4))
  assert not np.allclose(other['params']['fc']['kernel'], kernel)


# --- checkpoints and load_pretrained --------------------------------------------------------


def test_orbax_save_load_round_trip(tmp_path):
  variables = weights.load_torchvision(TINY_PTH, arch='tiny', num_classes=10)
  path = weights.save_checkpoint(variables, tmp_path / 'ckpt')
  _assert_trees_equal(weights.load_checkpoint(path), variables)
  with pytest.raises(FileExistsError, match='already exists'):
    weights.save_checkpoint(variables, path)


def test_find_imagenet_checkpoint_follows_the_environment(tmp_path, monkeypatch):
  monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(tmp_path / 'nothing_here'))
  assert weights.find_imagenet_checkpoint() is None
  monkeypatch.delenv(weights.WEIGHTS_DIR_ENV)
  assert weights.imagenet_checkpoint_dir() == weights.DEFAULT_CHECKPOINT_DIR
  assert weights.DEFAULT_CHECKPOINT_DIR == REFERENCE_DIR.parent / 'resnet18_imagenet'
  nested = tmp_path / 'resnet18_imagenet'
  weights.save_checkpoint({'params': {'x': np.ones(2, np.float32)}}, nested)
  monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(tmp_path))
  assert weights.find_imagenet_checkpoint() == nested
  monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(nested))
  assert weights.find_imagenet_checkpoint() == nested


def test_load_pretrained_without_weights_trains_from_scratch(tmp_path, monkeypatch):
  model = models.ResNetTiny(num_classes=3, norm='group_norm')
  monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(tmp_path / 'absent'))
  # An 'rbg' key compiles the init in ~1/4 of threefry's time on CPU; the logic is the same.
  key = jax.random.key(0, impl='rbg')
  for spec in ('none', 'imagenet'):
    variables, pretrained, description = weights.load_pretrained(spec, model, 3, key, (1, 32, 32, 3))
    assert not pretrained
    assert set(variables) == {'params'}
    assert variables['params']['fc']['kernel'].shape == (16, 3)
  assert 'from scratch' in description and str(tmp_path / 'absent') in description
  # torchvision's init: kaiming_normal_(fan_out, relu) convs, identity norms, Linear head.
  kernel = np.asarray(variables['params']['layer2_0']['conv2']['kernel']).ravel()  # 3x3, 16->16
  std = np.sqrt(2.0 / (3 * 3 * 16))
  assert scipy.stats.kstest(kernel, scipy.stats.norm(0, std).cdf).pvalue > 1e-3
  assert scipy.stats.kstest(kernel, scipy.stats.norm(0, 1.5 * std).cdf).pvalue < 1e-6
  np.testing.assert_array_equal(variables['params']['layer2_0']['bn2']['scale'], 1.0)
  np.testing.assert_array_equal(variables['params']['fc']['bias'], 0.0)
  assert np.abs(variables['params']['fc']['kernel']).max() <= 1.0 / np.sqrt(16)


def test_load_pretrained_imagenet_checkpoint_gets_a_new_head(tmp_path, monkeypatch):
  source = weights.load_torchvision(TINY_PTH, arch='tiny', num_classes=10)
  checkpoint = weights.save_checkpoint(source, tmp_path / 'resnet18_imagenet')
  monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(tmp_path))
  model = models.ResNetTiny(num_classes=3)
  variables, pretrained, description = weights.load_pretrained(
      'imagenet', model, 3, jax.random.key(0), (1, 32, 32, 3))
  assert pretrained
  assert str(checkpoint) in description and 'new 3-class head' in description
  _assert_trees_equal(variables['batch_stats'], source['batch_stats'])
  _assert_trees_equal(variables['params']['layer2_0'], source['params']['layer2_0'])
  assert variables['params']['fc']['kernel'].shape == (16, 3)


def test_load_pretrained_torch_file_into_group_norm_model():
  model = models.ResNetTiny(num_classes=10, norm='group_norm')
  variables, pretrained, description = weights.load_pretrained(
      str(TINY_PTH), model, 10, jax.random.key(0), (1, 32, 32, 3))
  source = weights.load_torchvision(TINY_PTH, arch='tiny', num_classes=10)
  assert pretrained and 'pretrained head kept' in description and 'GroupNorm' in description
  assert set(variables) == {'params'}
  _assert_trees_equal(variables['params']['layer1_0']['conv2'], source['params']['layer1_0']['conv2'])
  _assert_trees_equal(variables['params']['fc'], source['params']['fc'])
  np.testing.assert_array_equal(variables['params']['layer2_0']['downsample_bn']['scale'], 1.0)
  np.testing.assert_array_equal(variables['params']['bn1']['bias'], 0.0)


def test_load_pretrained_refuses_what_does_not_fit(tmp_path):
  tiny = models.ResNetTiny(num_classes=10)
  with pytest.raises(ValueError, match='num_classes'):
    weights.load_pretrained('none', tiny, 5, jax.random.key(0), (1, 32, 32, 3))
  with pytest.raises(FileNotFoundError, match='missing.pth'):
    weights.load_pretrained(str(tmp_path / 'missing.pth'), tiny, 10, jax.random.key(0), (1, 32, 32, 3))
  checkpoint = weights.save_checkpoint(
      weights.load_torchvision(TINY_PTH, arch='tiny', num_classes=10), tmp_path / 'tiny_ckpt')
  with pytest.raises(weights.WeightFileError,
                     match=r"\['bn1'\]\['mean'\] has shape \(8,\), the model expects \(64,\)"):
    weights.load_pretrained(str(checkpoint), models.ResNet18(num_classes=10), 10,
                            jax.random.key(0), (1, 32, 32, 3))


# --- weights/ scripts ---------------------------------------------------------------------


def test_convert_checks_the_published_sha256_prefix_and_writes_a_checkpoint(tmp_path):
  out = tmp_path / 'converted'
  with pytest.raises(SystemExit, match='does not start with f37072fd'):
    convert.main([f'--pth={TINY_PTH}', f'--out={out}', '--arch=tiny', '--num_classes=10'])
  assert not out.exists()
  convert.main([f'--pth={TINY_PTH}', f'--out={out}', '--arch=tiny', '--num_classes=10',
                '--skip_sha256_check'])
  _assert_trees_equal(weights.load_checkpoint(out),
                      weights.load_torchvision(TINY_PTH, arch='tiny', num_classes=10))
  sha256 = weights.sha256_of_file(TINY_PTH)
  assert weights.check_sha256_prefix(TINY_PTH, prefix=sha256[:8]) == sha256


def test_fetch_offline_says_where_to_put_the_file_in_one_line(tmp_path, monkeypatch):
  def offline(*args, **kwargs):
    raise urllib.error.URLError('Name or service not known')

  monkeypatch.delenv(weights.WEIGHTS_URL_ENV, raising=False)
  monkeypatch.setattr(urllib.request, 'urlopen', offline)
  dest = tmp_path / weights.TORCHVISION_RESNET18_FILENAME
  with pytest.raises(SystemExit) as error:
    fetch.main([f'--dest={dest}', f'--out={tmp_path / "out"}'])
  message = str(error.value.code)
  assert '\n' not in message
  assert f'python -m weights.convert --pth={dest}' in message
  assert weights.TORCHVISION_RESNET18_URL in message and 'Name or service not known' in message
  assert not dest.exists() and not (tmp_path / 'out').exists()
  assert list(tmp_path.iterdir()) == []  # No .part file either.


def test_fetch_rejects_a_download_with_the_wrong_hash(tmp_path, monkeypatch):
  monkeypatch.setenv(weights.WEIGHTS_URL_ENV, TINY_PTH.as_uri())  # A mirror with other bytes.
  dest = tmp_path / weights.TORCHVISION_RESNET18_FILENAME
  with pytest.raises(SystemExit, match='f37072fd') as error:
    fetch.main([f'--dest={dest}', f'--out={tmp_path / "out"}'])
  assert TINY_PTH.as_uri() in str(error.value.code)
  assert list(tmp_path.iterdir()) == []


def test_synthetic_pth_writer_matches_what_torch_save_wrote(tmp_path):
  path = tmp_path / 'written.pth'
  synthetic.write_torch_pth(path, _tiny_state_dict())
  written, saved_by_torch = weights.read_torch_state_dict(path), weights.read_torch_state_dict(TINY_PTH)
  assert list(written) == list(saved_by_torch)
  for key, value in saved_by_torch.items():
    assert written[key].dtype == value.dtype and written[key].shape == value.shape, key
    np.testing.assert_array_equal(written[key], value)
  other = tmp_path / 'again.pth'
  synthetic.write_torch_pth(other, _tiny_state_dict())
  assert other.read_bytes() == path.read_bytes()  # Deterministic.


def test_a_dpjax_release_model_is_named_as_such_not_called_corrupt(tmp_path):
  # What a finished run publishes: experiments/results.py export_model's release/model.msgpack.
  from flax import serialization
  variables = weights.load_torchvision(TINY_PTH, arch='tiny', num_classes=10)
  release = tmp_path / 'run' / 'release'
  release.mkdir(parents=True)
  model_file = release / 'model.msgpack'
  model_file.write_bytes(serialization.msgpack_serialize(
      {'params': variables['params'], 'batch_stats': variables['batch_stats']}))
  tiny = models.ResNetTiny(num_classes=10)
  for spec in (model_file, release):
    with pytest.raises(weights.WeightFileError) as error:
      weights.load_pretrained(str(spec), tiny, 10, jax.random.key(0), (1, 32, 32, 3))
    message = str(error.value)
    assert 'corrupt' not in message and '\n' not in message
    assert f'{model_file} is a dpjax release' in message
    assert 'torchvision' in message and 'msgpack_restore' in message
  # Other msgpack (not a model) is still an unreadable weight file.
  other = tmp_path / 'other.msgpack'
  other.write_bytes(serialization.msgpack_serialize({'x': np.ones(2)}))
  with pytest.raises(weights.WeightFileError, match='corrupt'):
    weights.load_torchvision(other)
