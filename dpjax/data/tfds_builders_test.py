"""Tests for the TFDS builders: ArrayRecord preparation and random access without TensorFlow."""

import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dpjax.data import folders, tfds_builders
from dpjax.data.conftest import PNEUMONIA_COUNTS, id_to_level


def _prepare(builder_cls, manual_dir, data_dir, prep_size, **kwargs):
  builder = builder_cls(config=tfds_builders.prep_config(prep_size), data_dir=str(data_dir), **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)),
                               file_format='array_record')
  return builder


def test_pneumonia_builder_array_record_without_tensorflow(pneumonia_dir, tmp_path):
  builder = _prepare(tfds_builders.ChestXrayPneumonia, pneumonia_dir, tmp_path, 9)
  assert 'tensorflow' not in sys.modules  # The whole path works with TF absent.
  assert builder.info.file_format.value == 'array_record'
  sources = builder.as_data_source()
  assert {k: len(v) for k, v in sources.items()} == {
      'train': sum(PNEUMONIA_COUNTS['train']), 'official_val': 4, 'test': sum(PNEUMONIA_COUNTS['test'])}
  records = sources['test'].__getitems__([0, 19, 5])
  metadata = builder.info.metadata
  for position, record in zip([0, 19, 5], records):
    assert record['image'].shape == (9, 9, 3) and record['image'].dtype == np.uint8
    assert record['label'] == metadata['splits']['test']['labels'][position]
    assert record['id'] == metadata['splits']['test']['ids'][position]
    np.testing.assert_allclose(record['image'], id_to_level(int(record['id'])), atol=3)  # JPEG rounding
  assert metadata['skipped'] == [] and 'nested duplicate' in metadata['notes'][0]


def test_preparation_leaves_no_temporary_folder(pneumonia_dir, tmp_path, monkeypatch):
  """TFDS's DatasetInfo.initialize_from_bucket leaked an empty /tmp/tmp*tfds per preparation."""
  import tempfile
  scratch = tmp_path / 'tmp'
  scratch.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(scratch))
  _prepare(tfds_builders.ChestXrayPneumonia, pneumonia_dir, tmp_path / 'data', 9)
  assert list(scratch.iterdir()) == []


def test_builder_config_per_prep_size():
  assert tfds_builders.prep_config(256).name == '256px'
  assert tfds_builders.prep_config(256) is tfds_builders.prep_config(256)
  assert '256px' in {c.name for c in tfds_builders.ChestXrayPneumonia.BUILDER_CONFIGS}
  assert 'manual_dir' in tfds_builders.Aptos2019.MANUAL_DOWNLOAD_INSTRUCTIONS or 'train.csv' in (
      tfds_builders.Aptos2019.MANUAL_DOWNLOAD_INSTRUCTIONS)


def test_corrupt_image_fails_preparation_naming_it(tmp_path):
  from dpjax.data.conftest import make_pneumonia_folder
  root = make_pneumonia_folder(tmp_path / 'data', corrupt=True)
  with pytest.raises(folders.DataError, match='Cannot decode image .*zz_corrupt.jpeg'):
    _prepare(tfds_builders.ChestXrayPneumonia, root, tmp_path / 'tfds', 8)
  builder = _prepare(tfds_builders.ChestXrayPneumonia, root, tmp_path / 'tfds_skip', 8, skip_bad=True)
  assert len(builder.info.metadata['skipped']) == 1
  assert 'zz_corrupt.jpeg' in builder.info.metadata['skipped'][0]
  assert len(builder.as_data_source()['test']) == sum(PNEUMONIA_COUNTS['test'])
