"""Tests for load_dataset: counts, per-unit hashed splits, gather, errors, skip_bad."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpjax.data import datasets, folders
from dpjax.data.conftest import (APTOS_GRADE_COUNTS, KERMANY_PATIENTS, PNEUMONIA_COUNTS, _write_image, id_to_level,
                                 make_aptos_folder)
from dpjax.data.folders import DataError

IMAGE_SIZE = 8  # prep_size 9


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('cache')


def _within_binomial(count, n, fraction, sigmas=4.0):
  """|count - n f| within `sigmas` binomial standard deviations (+1 for tiny n)."""
  return abs(count - n * fraction) <= sigmas * np.sqrt(n * fraction * (1 - fraction)) + 1


def _check_stratified(parts, pool_labels, fractions, num_classes):
  """Each class's share of each part is binomial around the fraction (units drawn one by one)."""
  pool_counts = np.bincount(pool_labels, minlength=num_classes)
  for part_labels, fraction in zip(parts, (1 - sum(fractions[1:]), *fractions[1:])):
    counts = np.bincount(part_labels, minlength=num_classes)
    assert all(_within_binomial(c, n, fraction) for c, n in zip(counts, pool_counts)), (counts, fraction * pool_counts)


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
  # Names like img000.jpeg carry no patient: every image is its own patient.
  total = sum(map(sum, PNEUMONIA_COUNTS.values()))
  assert d.patients['unparsed_file_names'] == d.patients['num_patients'] == total
  assert d.patients['per_split']['val'] == {'patients': len(d.val), 'images': len(d.val),
                                            'max_images_per_patient': 1, 'mean_images_per_patient': 1.0}
  assert d.patients['official_train_test_overlap'] == 0
  assert [u.tolist() for u in d.train.units()] == [[i] for i in range(len(d.train))]
  assert any(f'{total} file names carry no patient id' in note for note in d.notes)


def test_split_determinism_and_seed(aptos_clean_dir, cache):
  a = datasets.load_dataset('aptos', aptos_clean_dir, IMAGE_SIZE, seed=3, cache_dir=cache)
  b = datasets.load_dataset('aptos', aptos_clean_dir, IMAGE_SIZE, seed=3, cache_dir=cache)
  c = datasets.load_dataset('aptos', aptos_clean_dir, IMAGE_SIZE, seed=4, cache_dir=cache)
  for name in ('train', 'val', 'test'):
    np.testing.assert_array_equal(getattr(a, name).ids, getattr(b, name).ids)
  assert not np.array_equal(a.val.ids, c.val.ids)
  pool = np.concatenate([a.train.labels, a.val.labels, a.test.labels])
  assert np.bincount(pool).tolist() == list(APTOS_GRADE_COUNTS)
  _check_stratified([a.train.labels, a.val.labels, a.test.labels], pool, datasets.APTOS_SPLIT_FRACTIONS, 5)
  ids = np.concatenate([a.train.ids, a.val.ids, a.test.ids])
  assert len(np.unique(ids)) == len(ids) == sum(APTOS_GRADE_COUNTS)
  # No patient ids in APTOS: each image is its own unit.
  assert a.patients is None and a.train.patients is None and a.test.patients is None
  units = a.val.units()
  assert len(units) == len(a.val) and [u.tolist() for u in units] == [[i] for i in range(len(a.val))]


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


def test_bad_aptos_rows_error_then_skip(aptos_dir, cache):
  with pytest.raises(DataError, match='0123456789ab.png not found') as info:
    datasets.load_dataset('aptos', aptos_dir, IMAGE_SIZE, cache_dir=cache)
  assert info.value.skippable is True and 'skip_bad' not in str(info.value)
  d = datasets.load_dataset('aptos', aptos_dir, IMAGE_SIZE, skip_bad=True, cache_dir=cache)
  assert len(d.skipped) == 2 and "diagnosis '7'" in d.skipped[1]
  assert len(d.train) + len(d.val) + len(d.test) == sum(APTOS_GRADE_COUNTS)


def test_corrupt_image_error_then_skip(tmp_path, cache):
  root = make_aptos_folder(tmp_path, bad_rows=False, corrupt=True)
  with pytest.raises(DataError, match='Cannot decode image .*deadbeefdead.png') as info:
    datasets.load_dataset('aptos', root, IMAGE_SIZE, cache_dir=cache)
  assert info.value.skippable is True and 'skip_bad' not in str(info.value)
  d = datasets.load_dataset('aptos', root, IMAGE_SIZE, skip_bad=True, cache_dir=cache)
  assert len(d.skipped) == 1 and 'deadbeefdead.png' in d.skipped[0]
  assert len(d.train) + len(d.val) + len(d.test) == sum(APTOS_GRADE_COUNTS)
  # The prepared copy is reused, but still refuses the bad file without skip_bad: a skippable
  # error whose message names the file and no flag (the application appends its own hint).
  with pytest.raises(DataError, match='Cannot decode image .*deadbeefdead.png') as info:
    datasets.load_dataset('aptos', root, IMAGE_SIZE, cache_dir=cache)
  assert info.value.skippable is True and 'skip_bad' not in str(info.value) and 'more)' not in str(info.value)


def test_missing_data_dir(tmp_path):
  with pytest.raises(DataError, match='does not exist'):
    datasets.load_dataset('pneumonia', tmp_path / 'missing', IMAGE_SIZE, cache_dir=tmp_path)
  with pytest.raises(ValueError, match="Unknown dataset 'mnist'"):
    datasets.load_dataset('mnist', None, IMAGE_SIZE, cache_dir=tmp_path)


def _patient_names(data_dir):
  scan = folders.scan_pneumonia(data_dir)
  return {r.example_id: r.patient for records in scan.splits.values() for r in records}


def _official_counts(folder):
  """(NORMAL images, PNEUMONIA images), patients, max images per patient of a fixture folder."""
  groups = KERMANY_PATIENTS[folder]
  images = [sum(n for _, n in groups[c]) for c in ('NORMAL', 'PNEUMONIA')]
  sizes = [n for c in groups for _, n in groups[c]]
  return images, len(sizes), max(sizes)


def test_pneumonia_validation_split_is_patient_disjoint(kermany_dir, cache):
  names = _patient_names(kermany_dir)
  a = datasets.load_dataset('pneumonia', kermany_dir, IMAGE_SIZE, seed=0, cache_dir=cache)
  b = datasets.load_dataset('pneumonia', kermany_dir, IMAGE_SIZE, seed=0, cache_dir=cache)
  c = datasets.load_dataset('pneumonia', kermany_dir, IMAGE_SIZE, seed=1, cache_dir=cache)
  (num_normal, num_pneumonia), _, _ = _official_counts('train')
  for d in (a, c):
    train_patients = {names[i] for i in d.train.ids.tolist()}
    val_patients = {names[i] for i in d.val.ids.tolist()}
    assert val_patients and not train_patients & val_patients
    assert not set(d.train.patients.tolist()) & set(d.val.patients.tolist())
    # Whole patients: every train-folder image of a val patient is in val.
    sizes = {p: n for members in KERMANY_PATIENTS['train'].values() for p, n in members}
    assert len(d.val) == sum(sizes[p] for p in val_patients)
    # Each patient is drawn alone (about 10% of them, binomially); a class a split lacks is noted.
    assert _within_binomial(len(val_patients), len(sizes), datasets.PNEUMONIA_VAL_FRACTION)
    for missing in set(range(2)) - set(d.val.labels.tolist()):
      assert any(f'The val split has no images of class {d.class_names[missing]}' in n for n in d.notes), d.notes
    assert len(d.train) + len(d.val) == num_normal + num_pneumonia
    assert d.patients['train_val_overlap'] == 0
  for name in ('train', 'val', 'test'):
    np.testing.assert_array_equal(getattr(a, name).ids, getattr(b, name).ids)
  assert not np.array_equal(a.val.ids, c.val.ids)


def test_patient_indices_are_global(kermany_dir, cache):
  names = _patient_names(kermany_dir)
  d = datasets.load_dataset('pneumonia', kermany_dir, IMAGE_SIZE, seed=0, cache_dir=cache)
  index_to_name = {}
  for split in (d.train, d.val, d.test, d.official_val):
    for index, example_id in zip(split.patients.tolist(), split.ids.tolist()):
      assert index_to_name.setdefault(index, names[example_id]) == names[example_id]
  assert len(set(index_to_name.values())) == len(index_to_name)  # one index per patient string
  person3 = [i for i, n in index_to_name.items() if n == 'person3']
  assert len(person3) == 1 and person3[0] in d.test.patients.tolist()
  assert person3[0] in set(d.train.patients.tolist()) | set(d.val.patients.tolist())


def test_units_group_exactly_one_patients_positions(kermany_dir, cache):
  names = _patient_names(kermany_dir)
  empty = datasets.Split('empty', None, np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0))
  assert empty.units() == [] and datasets.Split('e', None, [], [], []).units() == []
  d = datasets.load_dataset('pneumonia', kermany_dir, IMAGE_SIZE, seed=0, cache_dir=cache)
  for split in (d.train, d.val, d.test):
    units = split.units()
    assert np.array_equal(np.sort(np.concatenate(units)), np.arange(len(split)))
    unit_names = []
    for unit in units:
      assert unit.dtype == np.int64 and np.all(np.diff(unit) > 0)
      assert len({names[i] for i in split.ids[unit].tolist()}) == 1
      assert len(set(split.patients[unit].tolist())) == 1
      unit_names.append(names[int(split.ids[unit[0]])])
    assert len(set(unit_names)) == len(units)  # no patient split over two units
    assert [int(split.patients[u[0]]) for u in units] == sorted(set(split.patients.tolist()))
    images, _, ids = split.gather(units[0])
    np.testing.assert_array_equal(ids, split.ids[units[0]])
    for image, example_id in zip(images, ids):
      np.testing.assert_allclose(image, id_to_level(int(example_id)), atol=1)
  # The two-film person101 of the test folder is one unit of two positions.
  sizes = {names[int(d.test.ids[u[0]])]: len(u) for u in d.test.units()}
  assert sizes['person101'] == 2 and sizes['person3'] == 1 and max(sizes.values()) == 2
  train_sizes = {names[int(s.ids[u[0]])]: len(u) for s in (d.train, d.val) for u in s.units()}
  assert train_sizes == {p: n for c in KERMANY_PATIENTS['train'].values() for p, n in c}


def test_patient_report_counts(kermany_dir, cache):
  d = datasets.load_dataset('pneumonia', kermany_dir, IMAGE_SIZE, seed=0, cache_dir=cache)
  report = json.loads(json.dumps(d.patients))  # JSON-serialisable, unchanged by the round trip
  assert report == d.patients
  assert report['unit'] == 'patient' and 'person' in report['id_source']
  assert report['official_train_test_overlap'] == 1  # person3
  assert report['official_train_val_overlap'] == 0
  assert report['unparsed_file_names'] == 1
  per_split = report['per_split']
  train_images, train_patients, train_max = _official_counts('train')
  assert per_split['train']['patients'] + per_split['val']['patients'] == train_patients == 35
  assert per_split['train']['images'] + per_split['val']['images'] == sum(train_images) == 69
  assert max(per_split['train']['max_images_per_patient'], per_split['val']['max_images_per_patient']) == train_max == 4
  for name in ('train', 'val', 'test', 'official_val'):
    entry = per_split[name]
    assert entry['mean_images_per_patient'] == pytest.approx(entry['images'] / entry['patients'], abs=1e-4)
  # test: 5 NORMAL + 4 two-film PNEUMONIA patients + person3 + the unparsed image = 11 patients, 15 images.
  assert per_split['test'] == {'patients': 11, 'images': 15, 'max_images_per_patient': 2,
                               'mean_images_per_patient': pytest.approx(15 / 11, abs=1e-4)}
  assert per_split['official_val'] == {'patients': 2, 'images': 3, 'max_images_per_patient': 2,
                                       'mean_images_per_patient': 1.5}
  assert report['num_patients'] == 35 + 11 + 2 - 1  # person3 counted once
  assert any('1 patients have images in both the official train and test' in n for n in d.notes)
  assert any('1 file names carry no patient id' in n for n in d.notes)


def test_group_labels_most_common_label():
  groups = np.array(['a', 'b', 'b', 'mixed', 'mixed', 'mixed'])
  labels = np.array([0, 1, 1, 1, 0, 1])
  group_of, group_label, group_size = datasets.group_labels(labels, groups)
  assert group_of.tolist() == [0, 1, 1, 2, 2, 2]
  assert group_label.tolist() == [0, 1, 1] and group_size.tolist() == [1, 2, 3]


# --- Per-unit splits: a neighbouring data set moves only the neighbour -------------------------


def _patients(num, seed=0):
  """(labels, patient names) per image of `num` patients of 1-4 images, classes 30/50/20 %,
  positions shuffled (a patient's images are not adjacent)."""
  rng = np.random.default_rng(seed)
  sizes = rng.integers(1, 5, num)
  patient_label = rng.choice(3, num, p=(0.3, 0.5, 0.2))
  names = np.repeat(np.array([f'person{i}' for i in range(num)], dtype=object), sizes)
  labels = np.repeat(patient_label, sizes)
  order = rng.permutation(len(labels))
  return labels[order], names[order]


def _part_of_patient(labels, names, fractions, seed):
  parts = datasets.stratified_group_split(labels, names, fractions, seed)
  part_of = {}
  for j, positions in enumerate(parts):
    for name in set(names[positions].tolist()):
      assert part_of.setdefault(name, j) == j  # a patient in two parts would fail here
  return part_of


def _part_of_image(labels, codes, fractions, seed):
  parts = datasets.stratified_split(labels, fractions, seed, keys=codes)
  return {codes[i]: j for j, positions in enumerate(parts) for i in positions.tolist()}


@pytest.mark.parametrize('fractions', [(0.9, 0.1), (0.7, 0.1, 0.2)])
def test_removing_or_adding_one_patient_moves_no_other_patient(fractions):
  # The attack: the seed is public and the adversary knows every patient but one. If the
  # neighbour's presence moved anyone else between train and val, the two candidate splits
  # would differ in many patients and the released validation metrics would tell them apart.
  labels, names = _patients(1300)
  full = _part_of_patient(labels, names, fractions, seed=0)
  assert len(set(full.values())) == len(fractions)
  everyone = sorted(full)
  for removed in [everyone[0], everyone[650], everyone[-1], *everyone[100:1300:97]]:
    keep = names != removed
    without = _part_of_patient(labels[keep], names[keep], fractions, seed=0)
    assert without == {p: j for p, j in full.items() if p != removed}, removed
  # Adding a patient (with images in the middle of the listing), or one more image of a
  # patient, changes nobody else's part either.
  at = len(labels) // 2
  added = _part_of_patient(np.insert(labels, at, [2, 2, 2]), np.insert(names, at, ['newcomer'] * 3),
                           fractions, seed=0)
  assert {p: j for p, j in added.items() if p != 'newcomer'} == full
  extra = _part_of_patient(np.append(labels, 1), np.append(names, 'person7'), fractions, seed=0)
  assert extra == full


def test_removing_or_adding_one_image_moves_no_other_image():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 5, 3000)
  codes = [rng.bytes(6).hex() for _ in range(len(labels))]
  fractions = datasets.APTOS_SPLIT_FRACTIONS
  full = _part_of_image(labels, codes, fractions, seed=0)
  for removed in (0, 1500, 2999, 17, 2345):
    keep = np.arange(len(labels)) != removed
    without = _part_of_image(labels[keep], [c for i, c in enumerate(codes) if i != removed], fractions, seed=0)
    assert without == {c: j for c, j in full.items() if c != codes[removed]}, removed
  added = _part_of_image(np.insert(labels, 10, 4), codes[:10] + ['0123456789ab'] + codes[10:], fractions, seed=0)
  assert {c: j for c, j in added.items() if c != '0123456789ab'} == full
  # A unit's part does not depend on its label, nor on where it sits in the listing.
  shuffled = rng.permutation(len(labels))
  moved = _part_of_image(rng.integers(0, 5, len(labels)), [codes[i] for i in shuffled], fractions, seed=0)
  assert moved == full


def test_split_fractions_hold_per_class():
  # Per class, each part's count is Binomial(n_c, fraction): within 5 standard deviations.
  rng = np.random.default_rng(2)
  labels = rng.choice(4, 40_000, p=(0.5, 0.25, 0.2, 0.05))
  codes = [f'img{i:06d}' for i in range(len(labels))]
  fractions = datasets.APTOS_SPLIT_FRACTIONS
  parts = datasets.stratified_split(labels, fractions, seed=0, keys=codes)
  assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
  for positions, fraction in zip(parts, fractions):
    assert np.all(np.diff(positions) > 0)  # sorted
    for c in range(4):
      n_c = int(np.sum(labels == c))
      assert _within_binomial(int(np.sum(labels[positions] == c)), n_c, fraction, sigmas=5), (c, fraction)
  # By patient: each class's patients (and, about, its images) go to val with probability 0.1.
  labels, names = _patients(20_000, seed=3)
  train, val = datasets.stratified_group_split(labels, names, (0.9, 0.1), seed=0)
  _, inverse, sizes = np.unique(names, return_inverse=True, return_counts=True)
  patient_label = np.zeros(len(sizes), int)
  patient_label[inverse] = labels
  in_val = np.zeros(len(sizes), bool)
  in_val[inverse[val]] = True
  for c in range(3):
    of_c = patient_label == c
    assert _within_binomial(int(in_val[of_c].sum()), int(of_c.sum()), 0.1, sigmas=5), c
    images = int(sizes[of_c].sum())
    sd = np.sqrt(0.1 * 0.9 * np.sum(sizes[of_c] ** 2))  # a patient's images move together
    assert abs(int(np.sum(labels[val] == c)) - 0.1 * images) <= 5 * sd, c
  assert len(train) + len(val) == len(labels)


def test_split_is_a_function_of_the_seed():
  labels, names = _patients(2000, seed=4)
  codes = [f'img{i}' for i in range(len(labels))]
  for seed in (0, 1, 12345):
    again = [datasets.stratified_group_split(labels, names, (0.9, 0.1), seed) for _ in range(2)]
    assert all(np.array_equal(x, y) for x, y in zip(*again))
    again = [datasets.stratified_split(labels, (0.7, 0.1, 0.2), seed, keys=codes) for _ in range(2)]
    assert all(np.array_equal(x, y) for x, y in zip(*again))
  vals = {seed: set(names[datasets.stratified_group_split(labels, names, (0.9, 0.1), seed)[1]].tolist())
          for seed in range(5)}
  assert len({frozenset(v) for v in vals.values()}) == 5  # another seed, another val set
  # ... and nearly independent: two seeds share about 10% of one val set.
  assert len(vals[0] & vals[1]) < 0.25 * len(vals[0])
  tests = {seed: datasets.stratified_split(labels, (0.7, 0.1, 0.2), seed, keys=codes)[2].tolist() for seed in range(3)}
  assert len({tuple(t) for t in tests.values()}) == 3
  # The uniform behind it: in [0, 1), a pure function of (seed, key), different per seed and key.
  u = [datasets.unit_split_uniform(seed, key) for seed in range(3) for key in ('person1', 'person2')]
  assert all(0 <= x < 1 for x in u) and len(set(u)) == len(u)
  assert datasets.unit_split_uniform(0, 'person1') == datasets.unit_split_uniform(0, 'person1')
  many = np.array([datasets.unit_split_uniform(7, f'k{i}') for i in range(20_000)])
  assert abs(many.mean() - 0.5) < 0.01 and abs(np.mean(many < 0.1) - 0.1) < 0.01


def test_patients_never_straddle_parts():
  labels, names = _patients(500, seed=5)
  for fractions in ((0.9, 0.1), (0.7, 0.1, 0.2), (0.0, 0.5, 0.5)):
    parts = datasets.stratified_group_split(labels, names, fractions, seed=0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    seen = [set(names[p].tolist()) for p in parts]
    for i in range(len(seen)):
      for j in range(i + 1, len(seen)):
        assert not seen[i] & seen[j]
    if fractions[0] == 0.0:
      assert len(parts[0]) == 0  # nothing above a cumulative fraction of 1
  # Integer group ids work the same way (they must be stable ids, not renumbered indices).
  groups = np.array([0] * 10 + list(range(1, 11)))
  for seed in range(5):
    parts = datasets.stratified_group_split(np.zeros(20, int), groups, (0.7, 0.1, 0.2), seed)
    assert sum(set(range(10)) <= set(p.tolist()) for p in parts) == 1  # group 0's 10 images stay together


def test_split_argument_errors():
  with pytest.raises(ValueError, match='cannot split'):
    datasets.stratified_group_split(np.zeros(2, int), np.arange(2), (0.0, 0.8, 0.8), seed=0)
  with pytest.raises(ValueError, match='cannot split'):
    datasets.stratified_split(np.zeros(2, int), (0.9, -0.1), seed=0, keys=['a', 'b'])
  with pytest.raises(ValueError, match='one shape'):
    datasets.stratified_group_split(np.zeros(3, int), np.arange(2), (0.9, 0.1), seed=0)
  with pytest.raises(ValueError, match='one key per position'):
    datasets.stratified_split(np.zeros(3, int), (0.9, 0.1), seed=0, keys=['a', 'b'])
  with pytest.raises(ValueError, match='distinct key'):
    datasets.stratified_split(np.zeros(2, int), (0.9, 0.1), seed=0, keys=['a', 'a'])
  with pytest.raises(TypeError, match='keys'):  # No silent fallback to positions (not stable).
    datasets.stratified_split(np.zeros(2, int), (0.9, 0.1), 0)  # pylint: disable=missing-kwoa


def _drop_pneumonia_patient(src, dst, patient):
  shutil.copytree(src, dst)
  removed = [p for p in (dst / 'chest_xray' / 'train').rglob('*.jpeg')
             if folders.pneumonia_patient_id(p.name) == patient]
  for path in removed:
    path.unlink()
  return len(removed)


def test_loaded_split_moves_only_the_removed_patient(kermany_dir, cache, tmp_path):
  # End to end through the loader (patients named from the files): one patient fewer in the
  # official train folder changes no other patient's split.
  names = _patient_names(kermany_dir)
  full = datasets.load_dataset('pneumonia', kermany_dir, IMAGE_SIZE, seed=0, cache_dir=cache)
  full_parts = {s: {names[i] for i in getattr(full, s).ids.tolist()} for s in ('train', 'val')}
  # One patient from val and one from train (with several images: later files shift ids).
  for patient in (sorted(full_parts['val'])[0], 'person4'):
    folder = tmp_path / f'without-{patient}'
    assert _drop_pneumonia_patient(kermany_dir, folder, patient) >= 1
    names_without = _patient_names(folder)
    d = datasets.load_dataset('pneumonia', folder, IMAGE_SIZE, seed=0, cache_dir=cache)
    for split in ('train', 'val'):
      assert {names_without[i] for i in getattr(d, split).ids.tolist()} == full_parts[split] - {patient}, split


def test_loaded_split_moves_only_the_removed_image(aptos_clean_dir, cache, tmp_path):
  def parts(folder, d):
    codes = [r.path.stem for r in folders.scan_aptos(folder).splits['labelled']]
    return {s: {codes[i] for i in getattr(d, s).ids.tolist()} for s in ('train', 'val', 'test')}
  full = parts(aptos_clean_dir, datasets.load_dataset('aptos', aptos_clean_dir, IMAGE_SIZE, seed=0, cache_dir=cache))
  folder = tmp_path / 'aptos_without_one'
  shutil.copytree(aptos_clean_dir, folder)
  lines = (folder / 'train.csv').read_text().splitlines()
  removed = lines[3].split(',')[0]  # An early row: every later row's example id shifts.
  (folder / 'train.csv').write_text('\n'.join(lines[:3] + lines[4:]) + '\n')
  without = parts(folder, datasets.load_dataset('aptos', folder, IMAGE_SIZE, seed=0, cache_dir=cache))
  assert without == {s: codes - {removed} for s, codes in full.items()}


def test_empty_validation_split_is_a_clear_error(tmp_path, cache):
  # Two patients in the official train folder: each goes to val with probability 0.1 on its
  # own, so for many seeds none does. Nobody is moved in to fill it (that would make their
  # split depend on the others): the loader says what happened instead.
  for split, names in (('train', ('IM-0001-0001.jpeg', 'person1_bacteria_1.jpeg')),
                       ('test', ('IM-0002-0001.jpeg', 'person2_bacteria_2.jpeg'))):
    for class_name, name in zip(('NORMAL', 'PNEUMONIA'), names):
      _write_image(tmp_path / 'chest_xray' / split / class_name / name, 100)
  seed = next(s for s in range(100)
              if min(datasets.unit_split_uniform(s, p) for p in ('IM-0001', 'person1')) >= datasets.PNEUMONIA_VAL_FRACTION)
  with pytest.raises(DataError, match='The val split is empty: each of the 2 patients goes to val with probability 0.1'):
    datasets.load_dataset('pneumonia', tmp_path, IMAGE_SIZE, seed=seed, cache_dir=cache)


# --- Scan first, fingerprint, load with the scan ------------------------------------------------


def test_scan_dataset_then_load_with_the_scan(tmp_path, aptos_clean_dir, monkeypatch):
  scan = datasets.scan_dataset('aptos', aptos_clean_dir)
  assert scan.dataset == 'aptos' and len(scan.splits['labelled']) == sum(APTOS_GRADE_COUNTS)
  calls = []
  real_scan_folder = folders.scan_folder
  monkeypatch.setattr(folders, 'scan_folder', lambda *a, **k: calls.append(a) or real_scan_folder(*a, **k))
  d = datasets.load_dataset('aptos', aptos_clean_dir, IMAGE_SIZE, cache_dir=tmp_path / 'cache', scan=scan)
  assert calls == []  # no second scan (neither in load_dataset nor in the TFDS builder)
  assert d.fingerprint == scan.content_fingerprint(datasets.cache_salt(tmp_path / 'cache')) and len(d.fingerprint) == 64
  assert len(d.train) + len(d.val) + len(d.test) == sum(APTOS_GRADE_COUNTS)
  # Without a scan: scanned once, the same fingerprint and the same prepared copy.
  again = datasets.load_dataset('aptos', aptos_clean_dir, IMAGE_SIZE, cache_dir=tmp_path / 'cache')
  assert len(calls) == 1 and again.fingerprint == d.fingerprint and again.prepared_dir == d.prepared_dir
  # The same data copied elsewhere (timestamps kept): the same fingerprint, another prepared copy.
  shutil.copytree(aptos_clean_dir, tmp_path / 'copy', copy_function=shutil.copy2)
  moved = datasets.load_dataset('aptos', tmp_path / 'copy', IMAGE_SIZE, cache_dir=tmp_path / 'cache')
  assert moved.fingerprint == d.fingerprint and moved.prepared_dir != d.prepared_dir
  with pytest.raises(ValueError, match="Expected a scan of 'pneumonia'"):
    datasets.load_dataset('pneumonia', aptos_clean_dir, IMAGE_SIZE, cache_dir=tmp_path / 'cache', scan=scan)
  with pytest.raises(ValueError, match="Unknown dataset 'mnist'"):
    datasets.scan_dataset('mnist', aptos_clean_dir)


# --- No unkeyed fingerprint of the data in any path or log ---------------------------------------


def _unkeyed_digests(scan):
  """Every unsalted digest an older dpjax showed: the cache key's 16 hex digits in the TFDS path,
  12 of the content fingerprint in a refused workdir's message."""
  return [scan.fingerprint()[:16], scan.fingerprint()[:12], scan.content_fingerprint()[:12]]


def test_the_prepared_copy_is_named_by_a_keyed_fingerprint(tmp_path, aptos_clean_dir, caplog, capfd):
  # An unkeyed hash of every file's path, size and time, printed by TFDS in the path of the
  # prepared copy, lets anyone who holds candidate data test who is in the data set.
  cache = tmp_path / 'cache'
  scan = datasets.scan_dataset('aptos', aptos_clean_dir)
  caplog.set_level('DEBUG')
  d = datasets.load_dataset('aptos', aptos_clean_dir, IMAGE_SIZE, cache_dir=cache, scan=scan)
  shown = caplog.text + ''.join(capfd.readouterr()) + d.prepared_dir + d.fingerprint + ''.join(
      str(p) for p in cache.rglob('*'))
  for digest in _unkeyed_digests(scan):
    assert digest not in shown
  salt_file = cache / datasets.CACHE_SALT_FILE
  assert len(salt_file.read_bytes()) == datasets.SALT_BYTES
  assert salt_file.stat().st_mode & 0o777 == 0o600
  # Made once: the same copy is found again; another cache (another salt) names it otherwise.
  assert datasets.load_dataset('aptos', aptos_clean_dir, IMAGE_SIZE, cache_dir=cache).prepared_dir == d.prepared_dir
  assert datasets.prepared_root(tmp_path / 'other', scan).name != datasets.prepared_root(cache, scan).name
  # Changed data still get another copy.
  data = tmp_path / 'data'
  shutil.copytree(aptos_clean_dir, data, copy_function=shutil.copy2)
  before = datasets.prepared_root(cache, datasets.scan_dataset('aptos', data))
  some = datasets.scan_dataset('aptos', data).splits['labelled'][0].path
  os.utime(some, ns=(some.stat().st_atime_ns, some.stat().st_mtime_ns + 10**9))
  assert datasets.prepared_root(cache, datasets.scan_dataset('aptos', data)) != before


def test_a_copy_prepared_under_the_unkeyed_name_is_kept_and_renamed(tmp_path, aptos_clean_dir, monkeypatch):
  cache = tmp_path / 'cache'
  scan = datasets.scan_dataset('aptos', aptos_clean_dir)
  d = datasets.load_dataset('aptos', aptos_clean_dir, IMAGE_SIZE, cache_dir=cache, scan=scan)
  keyed = datasets.prepared_root(cache, scan)
  # As an older dpjax left it: the prepared copy and its lock under the unkeyed name.
  legacy = keyed.with_name(f'aptos-{scan.fingerprint()[:16]}')
  keyed.rename(legacy)
  keyed.with_name(keyed.name + '.lock').rename(legacy.with_name(legacy.name + '.lock'))
  monkeypatch.setattr(datasets.tfds_builders._FolderBuilder, '_generate_examples',
                      lambda *a: pytest.fail('prepared again'))
  again = datasets.load_dataset('aptos', aptos_clean_dir, IMAGE_SIZE, cache_dir=cache, scan=scan)
  assert again.prepared_dir == d.prepared_dir and not legacy.exists()
  assert sorted(p.name for p in (cache / 'tfds').iterdir()) == [keyed.name, keyed.name + '.lock']
  for digest in _unkeyed_digests(scan):
    assert digest not in ''.join(str(p) for p in cache.rglob('*'))
  images, _, ids = again.train.gather(np.arange(3))
  for image, example_id in zip(images, ids):
    np.testing.assert_allclose(image, id_to_level(int(example_id)), atol=1)


def test_salt_files(tmp_path):
  path = tmp_path / 'deep' / 'salt'
  assert datasets.read_salt(path) is None
  salt = datasets.create_salt(path)
  assert len(salt) == datasets.SALT_BYTES and path.stat().st_mode & 0o777 == 0o600
  assert datasets.create_salt(path) == salt and datasets.create_salt(path, b'x' * 32) == salt  # never replaced
  assert [p.name for p in path.parent.iterdir()] == ['salt']  # no temporary file left
  path.write_bytes(b'short')
  with pytest.raises(DataError, match='not a secret salt file'):
    datasets.read_salt(path)


# --- Preparation: leftovers of killed runs, concurrent processes --------------------------------


def test_leftovers_of_a_killed_preparation_are_removed(tmp_path, aptos_clean_dir):
  cache = tmp_path / 'cache'
  scan = datasets.scan_dataset('aptos', aptos_clean_dir)
  root = datasets.prepared_root(cache, scan)
  # Where TFDS works (seen by killing a preparation): <data_dir>/<builder>/<config>/incomplete.<6>_<version>/;
  # and its atomic writes of .config/metadata.json go through incomplete.<uuid>.metadata.json.
  leftover = root / 'aptos2019' / f'{datasets.prep_size_for(IMAGE_SIZE)}px' / 'incomplete.K0U8HI_1.0.0'
  leftover.mkdir(parents=True)
  (leftover / 'aptos2019-train.array_record-00000-of-00001').write_bytes(b'half written')
  stale_config = root / 'aptos2019' / '.config' / ('incomplete.' + '0' * 32 + '.metadata.json')
  stale_config.parent.mkdir(parents=True)
  stale_config.write_text('{')
  d = datasets.load_dataset('aptos', aptos_clean_dir, IMAGE_SIZE, cache_dir=cache, scan=scan)
  assert Path(d.prepared_dir).parent == leftover.parent  # the leftover was where TFDS writes
  assert not leftover.exists() and not stale_config.exists()
  assert not list(root.rglob('incomplete.*'))
  assert (cache / 'tfds' / f'{root.name}.lock').is_file()
  assert len(d.train) + len(d.val) + len(d.test) == sum(APTOS_GRADE_COUNTS)
  images, labels, ids = d.train.gather(np.arange(3))
  for image, example_id in zip(images, ids):
    np.testing.assert_allclose(image, id_to_level(int(example_id)), atol=1)


_CONCURRENT_LOAD = """
import json, os, sys, time
from dpjax.data import datasets, tfds_builders
data_dir, cache, ready_dir, me, count = sys.argv[1:6]
# Preparation takes at least a second, so that the processes overlap in it.
generators = tfds_builders._FolderBuilder._split_generators
def slow_split_generators(self, dl_manager):
  time.sleep(1.0)
  return generators(self, dl_manager)
tfds_builders._FolderBuilder._split_generators = slow_split_generators
open(os.path.join(ready_dir, me), 'w').close()
deadline = time.time() + 120
while len(os.listdir(ready_dir)) < int(count) and time.time() < deadline:  # start together
  time.sleep(0.01)
d = datasets.load_dataset('aptos', data_dir, 8, cache_dir=cache)
print(json.dumps({name: [getattr(d, name).labels.tolist(), getattr(d, name).ids.tolist()]
                  for name in ('train', 'val', 'test')} | {'dir': d.prepared_dir, 'fingerprint': d.fingerprint}))
"""


def test_concurrent_processes_prepare_once_and_agree(tmp_path, aptos_clean_dir):
  cache, ready = tmp_path / 'cache', tmp_path / 'ready'
  ready.mkdir()
  repo = Path(__file__).resolve().parents[2]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get('PYTHONPATH')])),
             JAX_PLATFORMS='cpu')
  processes = [subprocess.Popen([sys.executable, '-c', _CONCURRENT_LOAD, str(aptos_clean_dir), str(cache), str(ready),
                                 str(i), '2'], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for i in range(2)]
  results = []
  for process in processes:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  assert results[0] == results[1]  # same labels, ids, prepared copy and fingerprint
  assert sum(len(results[0][n][1]) for n in ('train', 'val', 'test')) == sum(APTOS_GRADE_COUNTS)
  assert not list((cache / 'tfds').rglob('incomplete.*'))
  assert [p.name for p in (cache / 'tfds').iterdir() if p.suffix == '.lock'] == [Path(results[0]['dir']).parents[2].name + '.lock']
