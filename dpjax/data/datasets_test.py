"""Tests for load_dataset: counts, stratified seeded splits, gather, errors, skip_bad, demo."""

import numpy as np
import pytest

from dpjax.data import datasets, demo
from dpjax.data.conftest import (APTOS_GRADE_COUNTS, PNEUMONIA_COUNTS, id_to_level, make_aptos_folder,
                                 make_pneumonia_folder)
from dpjax.data.folders import DataError

IMAGE_SIZE = 8  # prep_size 9


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('cache')


def _check_stratified(parts, pool_labels, fractions, num_classes):
  pool_counts = np.bincount(pool_labels, minlength=num_classes)
  for part_labels, fraction in zip(parts[1:], fractions[1:]):
    counts = np.bincount(part_labels, minlength=num_classes)
    assert np.all(np.abs(counts - fraction * pool_counts) <= 1), (counts, fraction * pool_counts)


def test_pneumonia_splits(pneumonia_dir, cache):
  d = datasets.load_dataset('pneumonia', pneumonia_dir, IMAGE_SIZE, seed=0, cache_dir=cache)
  assert d.prep_size == 9 and d.num_classes == 2 and d.class_names == ('NORMAL', 'PNEUMONIA')
  assert not d.is_demo and d.source == str((pneumonia_dir / 'chest_xray').resolve())
  assert d.skipped == [] and 'nested duplicate' in d.notes[0]
  # No double counting despite the nested duplicate; official test kept whole.
  assert len(d.train) + len(d.val) == sum(PNEUMONIA_COUNTS['train'])
  assert np.bincount(d.test.labels).tolist() == list(PNEUMONIA_COUNTS['test'])
  assert np.bincount(d.official_val.labels).tolist() == list(PNEUMONIA_COUNTS['val'])
  pool = np.concatenate([d.train.labels, d.val.labels])
  _check_stratified([d.train.labels, d.val.labels], pool, (0.9, 0.1), 2)
  all_ids = np.concatenate([d.train.ids, d.val.ids, d.test.ids, d.official_val.ids])
  assert len(np.unique(all_ids)) == len(all_ids)  # disjoint splits, unique ids
  assert str(cache) in d.prepared_dir and str(pneumonia_dir) not in d.prepared_dir


def test_split_determinism_and_seed(aptos_clean_dir, cache):
  a = datasets.load_dataset('aptos', aptos_clean_dir, IMAGE_SIZE, seed=3, cache_dir=cache)
  b = datasets.load_dataset('aptos', aptos_clean_dir, IMAGE_SIZE, seed=3, cache_dir=cache)
  c = datasets.load_dataset('aptos', aptos_clean_dir, IMAGE_SIZE, seed=4, cache_dir=cache)
  for name in ('train', 'val', 'test'):
    np.testing.assert_array_equal(getattr(a, name).ids, getattr(b, name).ids)
  assert not np.array_equal(a.val.ids, c.val.ids)
  assert [len(a.train), len(a.val), len(a.test)] == [len(c.train), len(c.val), len(c.test)]
  pool = np.concatenate([a.train.labels, a.val.labels, a.test.labels])
  assert np.bincount(pool).tolist() == list(APTOS_GRADE_COUNTS)
  _check_stratified([a.train.labels, a.val.labels, a.test.labels], pool, datasets.APTOS_SPLIT_FRACTIONS, 5)
  ids = np.concatenate([a.train.ids, a.val.ids, a.test.ids])
  assert len(np.unique(ids)) == len(ids) == sum(APTOS_GRADE_COUNTS)


def test_gather_returns_matching_images_labels_ids(aptos_clean_dir, cache):
  d = datasets.load_dataset('aptos', aptos_clean_dir, IMAGE_SIZE, seed=0, cache_dir=cache)
  indices = np.array([3, 0, len(d.train) - 1, 3])
  images, labels, ids = d.train.gather(indices)
  assert images.shape == (4, 9, 9, 3) and images.dtype == np.uint8
  assert labels.dtype == np.int32 and ids.dtype == np.int64
  np.testing.assert_array_equal(labels, d.train.labels[indices])
  np.testing.assert_array_equal(ids, d.train.ids[indices])
  for image, example_id in zip(images, ids):  # Each fixture image is a constant grey keyed on its id.
    np.testing.assert_allclose(image, id_to_level(int(example_id)), atol=1)
  d.train.fast_decode = False  # TFDS's own decoding gives the same arrays.
  slow = d.train.gather(indices)
  d.train.fast_decode = True
  for fast_part, slow_part in zip((images, labels, ids), slow):
    np.testing.assert_array_equal(fast_part, slow_part)
  empty = d.val.gather(np.zeros((0,), np.int64))
  assert empty[0].shape == (0, 9, 9, 3) and empty[1].shape == (0,)
  with pytest.raises(IndexError, match='Expected indices in'):
    d.val.gather(np.array([len(d.val)]))


def test_stratified_split_closed_form():
  labels = np.array([0] * 50 + [1] * 30 + [2] * 5)
  train, val, test = datasets.stratified_split(labels, (0.7, 0.1, 0.2), seed=0)
  assert [np.bincount(labels[p], minlength=3).tolist() for p in (val, test)] == [[5, 3, 0], [10, 6, 1]]
  assert len(train) + len(val) + len(test) == len(labels)
  assert len(np.intersect1d(train, val)) == len(np.intersect1d(train, test)) == 0


def test_bad_aptos_rows_error_then_skip(aptos_dir, cache):
  with pytest.raises(DataError, match='0123456789ab.png not found'):
    datasets.load_dataset('aptos', aptos_dir, IMAGE_SIZE, cache_dir=cache)
  d = datasets.load_dataset('aptos', aptos_dir, IMAGE_SIZE, skip_bad=True, cache_dir=cache)
  assert len(d.skipped) == 2 and "diagnosis '7'" in d.skipped[1]
  assert len(d.train) + len(d.val) + len(d.test) == sum(APTOS_GRADE_COUNTS)


def test_corrupt_image_error_then_skip(tmp_path, cache):
  root = make_aptos_folder(tmp_path, bad_rows=False, corrupt=True)
  with pytest.raises(DataError, match='Cannot decode image .*deadbeefdead.png'):
    datasets.load_dataset('aptos', root, IMAGE_SIZE, cache_dir=cache)
  d = datasets.load_dataset('aptos', root, IMAGE_SIZE, skip_bad=True, cache_dir=cache)
  assert len(d.skipped) == 1 and 'deadbeefdead.png' in d.skipped[0]
  assert len(d.train) + len(d.val) + len(d.test) == sum(APTOS_GRADE_COUNTS)
  # The prepared copy is reused, but still refuses the bad file without skip_bad.
  with pytest.raises(DataError, match='deadbeefdead.png.*pass skip_bad=True'):
    datasets.load_dataset('aptos', root, IMAGE_SIZE, cache_dir=cache)


def test_missing_data_dir(tmp_path):
  with pytest.raises(DataError, match='does not exist'):
    datasets.load_dataset('pneumonia', tmp_path / 'missing', IMAGE_SIZE, cache_dir=tmp_path)
  with pytest.raises(ValueError, match="Unknown dataset 'mnist'"):
    datasets.load_dataset('mnist', None, IMAGE_SIZE, cache_dir=tmp_path)


def test_demo_data_loads_through_the_same_path(tmp_path, monkeypatch):
  monkeypatch.setattr(demo, 'PNEUMONIA_DEMO_SIZES', {'train': 40, 'val': 4, 'test': 16})
  d = datasets.load_dataset('pneumonia', None, IMAGE_SIZE, cache_dir=tmp_path)
  assert d.is_demo and d.source == 'demo'
  assert (tmp_path / 'demo' / 'pneumonia-v1-seed0' / 'chest_xray' / 'train').is_dir()
  assert len(d.train) + len(d.val) == 40 and len(d.test) == 16 and len(d.official_val) == 4
  assert np.bincount(d.test.labels).tolist() == [6, 10]  # 62.5% PNEUMONIA
  images, labels, _ = d.test.gather(np.arange(4))
  assert images.shape == (4, 9, 9, 3)
  np.testing.assert_array_equal(images[..., 0], images[..., 2])  # grayscale X-ray, 3 channels
