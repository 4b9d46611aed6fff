"""Tests for the synthetic demo data: layout, determinism, class proportions, signal."""

import csv
import re

import numpy as np
import pytest
from PIL import Image

from dpjax.data import demo, folders

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
  if dataset == 'pneumonia':  # Same file names, different pixels.
    assert sorted(images) == sorted(k for k in c if k.endswith('.jpeg'))
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
  assert path == tmp_path / 'demo' / 'aptos-v1-seed2'
  assert (path / demo.MANIFEST_NAME).is_file()
  stamp = (path / 'train.csv').stat().st_mtime_ns
  assert demo.ensure_demo_data('aptos', tmp_path, seed=2) == path
  assert (path / 'train.csv').stat().st_mtime_ns == stamp  # reused, not rewritten
  assert [p.name for p in (tmp_path / 'demo').iterdir()] == ['aptos-v1-seed2']  # no temp left
  monkeypatch.setenv('DPJAX_CACHE', str(tmp_path / 'env'))
  assert demo.default_cache_root() == tmp_path / 'env'


def test_pneumonia_opacities_brighten_the_lungs():
  # Paired films (same generator state = same anatomy and exposure): consolidation makes the
  # lung band brighter in every pair.
  def lung_mean(label, i):
    image = demo.render_chest_xray(np.random.default_rng([5, i]), label).astype(np.float64)
    return image[60:200].mean() / 255
  differences = np.array([lung_mean(1, i) - lung_mean(0, i) for i in range(12)])
  assert np.all(differences > 0) and differences.mean() > 0.01, differences


def test_fundus_lesions_grow_with_grade():
  def lesion_fraction(grade, i):
    image = demo.render_fundus(np.random.default_rng([6, grade, i]), grade).astype(np.int32)
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    yellow = (r > 180) & (g > 150) & (b < 140) & (g > 1.6 * b)
    return yellow.mean()
  fractions = [np.mean([lesion_fraction(grade, i) for i in range(4)]) for grade in (0, 3)]
  assert fractions[1] > 3 * fractions[0] + 1e-4
