"""Tests for the synthetic demo data: layout, determinism, class proportions, signal."""

import collections
import csv
import json
import re

import numpy as np
import pytest
from PIL import Image

from dpjax.data import datasets, folders
from experiments import demo_data as demo

SMALL_PNEUMONIA = {'train': [3, 5], 'val': [1, 1], 'test': [2, 3]}
SMALL_APTOS = {'train': [4, 1, 2, 1, 2]}


def _tree_bytes(root):
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


@pytest.mark.parametrize('dataset,counts', [('pneumonia', SMALL_PNEUMONIA), ('aptos', SMALL_APTOS)])
def test_same_seed_identical_bytes_other_seed_differs(tmp_path, dataset, counts):
  demo.write_demo_data(dataset, tmp_path / 'a', seed=7, class_counts=counts)
  demo.write_demo_data(dataset, tmp_path / 'b', seed=7, class_counts=counts)
  demo.write_demo_data(dataset, tmp_path / 'c', seed=8, class_counts=counts)
  a, b, c = (_tree_bytes(tmp_path / x) for x in 'abc')
  assert a == b
  assert len(a) == sum(map(sum, counts.values())) + (2 if dataset == 'aptos' else 1)  # + csv, manifest
  images = [k for k in a if k.endswith(('.jpeg', '.png'))]
  if dataset == 'pneumonia':  # Same images per folder; the seed also redraws the patients' films.
    folder_counts = lambda tree: sorted(collections.Counter(k.rsplit('/', 1)[0] for k in tree if k.endswith('.jpeg')).items())
    assert folder_counts(a) == folder_counts(c)
  assert all(a[k] != c.get(k) for k in images)


def test_class_counts_follow_the_real_imbalance():
  counts = demo.demo_class_counts('pneumonia')
  assert counts['val'] == [8, 8]
  assert sum(counts['train']) == 800 and abs(counts['train'][1] / 800 - 3875 / 5216) < 0.002
  assert counts['test'] == [90, 150]  # 62.5% PNEUMONIA, as 390/624
  aptos = demo.demo_class_counts('aptos')['train']
  assert sum(aptos) == 800
  np.testing.assert_allclose(np.array(aptos) / 800, [0.493, 0.101, 0.273, 0.053, 0.081], atol=0.002)
  assert demo.proportional_counts(10, [1, 1, 1]) == [4, 3, 3]


def test_pneumonia_layout_and_format(tmp_path):
  demo.write_demo_data('pneumonia', tmp_path, seed=0, class_counts=SMALL_PNEUMONIA)
  scan = folders.scan_pneumonia(tmp_path)
  assert np.bincount([r.label for r in scan.splits['train']]).tolist() == SMALL_PNEUMONIA['train']
  with Image.open(scan.splits['test'][0].path) as image:
    assert image.format == 'JPEG' and image.mode == 'L' and image.size[1] == 256 and image.size[0] >= 256


def test_aptos_layout_and_format(tmp_path):
  demo.write_demo_data('aptos', tmp_path, seed=0, class_counts=SMALL_APTOS)
  with open(tmp_path / 'train.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert [r['id_code'] for r in rows] and all(re.fullmatch('[0-9a-f]{12}', r['id_code']) for r in rows)
  assert np.bincount([int(r['diagnosis']) for r in rows]).tolist() == SMALL_APTOS['train']
  with Image.open(tmp_path / 'train_images' / f"{rows[0]['id_code']}.png") as image:
    assert image.format == 'PNG' and image.mode == 'RGB' and image.size[1] == 256
  assert len(folders.scan_aptos(tmp_path).splits['labelled']) == len(rows)


def test_ensure_demo_data_is_idempotent(tmp_path, monkeypatch):
  monkeypatch.setattr(demo, 'APTOS_DEMO_SIZE', 6)
  path = demo.ensure_demo_data('aptos', tmp_path, seed=2)
  assert path == tmp_path / 'demo' / f'aptos-v{demo.DEMO_VERSION}-seed2'
  assert (path / demo.MANIFEST_NAME).is_file()
  stamp = (path / 'train.csv').stat().st_mtime_ns
  assert demo.ensure_demo_data('aptos', tmp_path, seed=2) == path
  assert (path / 'train.csv').stat().st_mtime_ns == stamp  # reused, not rewritten
  assert [p.name for p in (tmp_path / 'demo').iterdir()] == [f'aptos-v{demo.DEMO_VERSION}-seed2']  # no temp left
  monkeypatch.setenv('DPJAX_CACHE', str(tmp_path / 'env'))
  assert datasets.default_cache_root() == tmp_path / 'env'


def test_pneumonia_opacities_brighten_the_lungs():
  # Paired films (same generator state = same anatomy and exposure): consolidation makes the
  # lung band brighter in every pair.
  def lung_mean(label, i):
    image = demo.render_chest_xray(np.random.default_rng([5, i]), label).astype(np.float64)
    return image[60:200].mean() / 255
  differences = np.array([lung_mean(1, i) - lung_mean(0, i) for i in range(12)])
  assert np.all(differences > 0) and differences.mean() > 0.01, differences


TINY_PNEUMONIA = {'train': [12, 28], 'val': [2, 2], 'test': [6, 10]}


def test_consolidation_is_large_and_dense_inside_the_lungs():
  # Version 3's signal must be visible to a reader and learnable at 64 px: in the lung fields,
  # pneumonia films are markedly brighter than normal ones, and the bright area is large.
  def lung_stats(label, patient):
    pixels, lungs = demo.pneumonia_film(0, label, patient, 1, lung_mask=True)
    inside = pixels[lungs].astype(np.float64) / 255
    return inside.mean(), np.mean(inside > 0.6)
  normal = np.array([lung_stats(0, p) for p in range(1, 9)])
  pneumonia = np.array([lung_stats(1, p) for p in range(1, 9)])
  assert pneumonia[:, 0].mean() > normal[:, 0].mean() + 0.05, (normal, pneumonia)
  assert pneumonia[:, 1].mean() > 0.1 > normal[:, 1].mean(), (normal, pneumonia)


def test_fundus_lesion_area_grows_with_grade():
  area = [np.mean([demo.aptos_image(0, 10 * grade + i, grade, lesion_mask=True)[1].mean()
                   for i in range(3)]) for grade in range(5)]
  assert area[0] < area[1] < area[2] < area[3], area
  assert area[4] > area[2] and area[3] > 0.01, area


def test_pneumonia_demo_has_patients_with_several_films(tmp_path):
  demo.write_demo_data('pneumonia', tmp_path, seed=0, class_counts=TINY_PNEUMONIA)
  scan = folders.scan_pneumonia(tmp_path)
  assert scan.unparsed_patient_names == 0  # Every demo name is Kermany-style.
  place = {}  # patient -> (split, label)
  for split, folder in folders.PNEUMONIA_SPLITS.items():
    records = scan.splits[split]
    assert np.bincount([r.label for r in records], minlength=2).tolist() == TINY_PNEUMONIA[folder]
    for r in records:  # One patient: one split folder, one class.
      assert place.setdefault(r.patient, (split, r.label)) == (split, r.label), r.path
      pattern = r'IM-\d{4}-\d{4}\.jpeg' if r.label == 0 else r'person\d+_(bacteria|virus)_\d+\.jpeg'
      assert re.fullmatch(pattern, r.path.name), r.path.name
  films = {}
  for records in scan.splits.values():
    for r in records:
      films.setdefault((r.label, r.patient), []).append(r.path.name)
  pneumonia = [len(v) for (label, _), v in films.items() if label == 1]
  normal = [len(v) for (label, _), v in films.items() if label == 0]
  assert max(pneumonia) >= 2 and np.mean(pneumonia) > 1.2 and max(pneumonia) <= 4
  assert max(normal) <= 3 and 1.0 <= np.mean(normal) < np.mean(pneumonia)
  assert sum(pneumonia) + sum(normal) == sum(map(sum, TINY_PNEUMONIA.values()))
  manifest = json.loads((tmp_path / demo.MANIFEST_NAME).read_text())
  assert manifest['version'] == demo.DEMO_VERSION and manifest['class_counts'] == TINY_PNEUMONIA


def test_default_demo_films_per_patient():
  counts = demo.demo_class_counts('pneumonia')
  sizes = {(split, label): demo.patient_film_counts(0, split, label, n)
           for split, per_class in counts.items() for label, n in enumerate(per_class)}
  for (split, label), films in sizes.items():
    assert sum(films) == counts[split][label] and min(films) >= 1
  train_pneumonia, train_normal = sizes['train', 1], sizes['train', 0]
  assert (len(train_pneumonia), max(train_pneumonia)) == (302, 4)  # 594 films, mean 1.97
  assert 1.8 < np.mean(train_pneumonia) < 2.2 and 1.15 < np.mean(train_normal) < 1.45
  assert (len(train_normal), max(train_normal)) == (160, 3)  # 206 films, mean 1.29


def test_films_of_one_patient_share_the_anatomy():
  # Same anatomy generator, new film generator: the central region correlates more than
  # between two patients (framing, exposure and noise still differ film to film).
  def film(patient, k):
    image = demo.render_chest_xray(np.random.default_rng([9, patient]), 0,
                                   film_rng=np.random.default_rng([10, patient, k])).astype(np.float64)
    left = (image.shape[1] - 256) // 2
    blocks = image[:, left:left + 256].reshape(32, 8, 32, 8).mean(axis=(1, 3))
    return (blocks - blocks.mean()) / blocks.std()
  same = [np.mean(film(p, 0) * film(p, 1)) for p in range(8)]
  other = [np.mean(film(p, 0) * film(p + 100, 1)) for p in range(8)]
  assert np.mean(same) > np.mean(other) + 0.05, (same, other)
  a, b = film(3, 0), film(3, 1)
  assert not np.array_equal(a, b)  # different films


def test_fundus_lesions_grow_with_grade():
  def lesion_fraction(grade, i):
    image = demo.render_fundus(np.random.default_rng([6, grade, i]), grade).astype(np.int32)
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    yellow = (r > 180) & (g > 150) & (b < 140) & (g > 1.6 * b)
    return yellow.mean()
  fractions = [np.mean([lesion_fraction(grade, i) for i in range(4)]) for grade in (0, 3)]
  assert fractions[1] > 3 * fractions[0] + 1e-4


def test_demo_data_loads_through_the_real_path(tmp_path, monkeypatch):
  monkeypatch.setattr(demo, 'PNEUMONIA_DEMO_SIZES', {'train': 40, 'val': 4, 'test': 16})
  folder = demo.ensure_demo_data('pneumonia', tmp_path)
  assert folder == tmp_path / 'demo' / f'pneumonia-v{demo.DEMO_VERSION}-seed0'
  scan = datasets.scan_dataset('pneumonia', folder)
  assert sum(len(records) for records in scan.splits.values()) == 60
  d = datasets.load_dataset('pneumonia', folder, 8, cache_dir=tmp_path, scan=scan)
  # Keyed with the cache's secret salt (issue 23): the unkeyed hash would identify the data.
  assert d.fingerprint == scan.content_fingerprint(datasets.cache_salt(tmp_path))
  assert d.fingerprint != scan.content_fingerprint()
  assert len(d.train) + len(d.val) == 40 and len(d.test) == 16 and len(d.official_val) == 4
  assert np.bincount(d.test.labels).tolist() == [6, 10]  # 62.5% PNEUMONIA
  # Demo names are Kermany-style, with several films per patient, and the split is by patient.
  report = d.patients
  assert report['unparsed_file_names'] == 0 and report['train_val_overlap'] == 0
  assert report['official_train_test_overlap'] == 0
  assert report['per_split']['test']['images'] == 16 and report['per_split']['test']['patients'] < 16
  assert max(report['per_split'][s]['max_images_per_patient'] for s in ('train', 'val')) >= 2
  assert not set(d.train.patients.tolist()) & set(d.val.patients.tolist())
  images, _, _ = d.test.gather(np.arange(4))
  assert images.shape == (4, 9, 9, 3)
  np.testing.assert_array_equal(images[..., 0], images[..., 2])  # grayscale X-ray, 3 channels
