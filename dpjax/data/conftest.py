"""Small on-disk fixtures in the real Kaggle layouts, with the usual mess included.

Every image is a constant grey level ``id_to_level(example_id)`` so tests can check that a
gathered image belongs to the id returned with it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Pneumonia fixture: (NORMAL, PNEUMONIA) per split folder.
PNEUMONIA_COUNTS = {'train': (13, 37), 'val': (2, 2), 'test': (8, 12)}
APTOS_GRADE_COUNTS = (20, 4, 11, 3, 5)  # 43 good rows
APTOS_BAD_ROWS = 2  # One row whose image is missing, one with label 7.


def id_to_level(example_id: int) -> int:
  return (example_id * 7 + 3) % 256


def _write_image(path: Path, level: int, size=(30, 24), mode='L') -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new(mode, size, level if mode == 'L' else (level,) * 3).save(path, format='PNG' if path.suffix == '.png' else 'JPEG', quality=95)


def make_pneumonia_folder(root: Path, *, corrupt: bool = False) -> Path:
  """``root/chest_xray/...`` plus the zip's nested duplicate, __MACOSX and dot files."""
  inner = root / 'chest_xray'
  example_id = 0  # Same order as the scanner: split (train, val, test), class, sorted name.
  for split in ('train', 'val', 'test'):
    for label, class_name in enumerate(('NORMAL', 'PNEUMONIA')):
      for i in range(PNEUMONIA_COUNTS[split][label]):
        _write_image(inner / split / class_name / f'img{i:03d}.jpeg', id_to_level(example_id))
        example_id += 1
  shutil.copytree(inner, root / 'chest_xray_copy')
  (root / 'chest_xray_copy').rename(inner / 'chest_xray')  # Nested duplicate, as in archive.zip.
  for folder in (inner / 'train' / 'NORMAL', inner / 'test' / 'PNEUMONIA'):
    (folder / '.DS_Store').write_bytes(b'\0\0\0\1Bud1')
    (folder / '._x.jpeg').write_bytes(b'\0\5\26\7 resource fork')
  (root / '__MACOSX' / 'chest_xray' / 'train' / 'NORMAL').mkdir(parents=True)
  (root / '__MACOSX' / 'chest_xray' / 'train' / 'NORMAL' / '._img000.jpeg').write_bytes(b'\0\5\26\7')
  (root / '.DS_Store').write_bytes(b'\0')
  if corrupt:  # Sorts last in test/PNEUMONIA, so it would get the last id.
    (inner / 'test' / 'PNEUMONIA' / 'zz_corrupt.jpeg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  return root


# Kermany-named fixture: split folder -> class -> [(patient, number of images)]. 'person3' has
# images in both the official train and test folders; one test name has no patient id.
KERMANY_PATIENTS = {
    'train': {
        'NORMAL': [(f'IM-{i:04d}', (1, 1, 2, 1, 3)[i % 5]) for i in range(1, 15)] + [('NORMAL2-IM-0500', 2)],
        'PNEUMONIA': [(f'person{i}', (1, 2, 3, 2, 4, 1)[i % 6]) for i in range(1, 21)],
    },
    'val': {'NORMAL': [('NORMAL2-IM-1427', 1)], 'PNEUMONIA': [('person1946', 2)]},
    'test': {
        'NORMAL': [(f'IM-{i:04d}', 1) for i in range(1001, 1006)],
        'PNEUMONIA': [(f'person{i}', 2) for i in range(101, 105)] + [('person3', 1), (None, 1)],
    },
}
KERMANY_UNPARSED_NAME = 'scan_without_patient.jpeg'


def kermany_names(split: str, class_name: str) -> list[tuple[str, str | None]]:
  """(file name, patient) of one fixture folder, in the scanner's (sorted) order."""
  names, image_number = [], 1000 * ('train', 'val', 'test').index(split)
  for patient, count in KERMANY_PATIENTS[split][class_name]:
    for k in range(1, count + 1):
      image_number += 1
      if patient is None:
        names.append((KERMANY_UNPARSED_NAME, None))
      elif class_name == 'NORMAL':
        names.append((f'{patient}-{k:04d}.jpeg', patient))
      else:
        kind = ('bacteria', 'virus')[int(patient[6:]) % 2]
        names.append((f'{patient}_{kind}_{image_number}.jpeg', patient))
  return sorted(names)


def make_kermany_folder(root: Path) -> Path:
  """``root/chest_xray/...`` with Kermany file names, several images per patient."""
  example_id = 0
  for split in ('train', 'val', 'test'):
    for class_name in ('NORMAL', 'PNEUMONIA'):
      for name, _ in kermany_names(split, class_name):
        _write_image(root / 'chest_xray' / split / class_name / name, id_to_level(example_id))
        example_id += 1
  return root


def make_aptos_folder(root: Path, *, bad_rows: bool = True, corrupt: bool = False) -> Path:
  rng = np.random.default_rng(123)
  labels = rng.permutation(np.repeat(np.arange(5), APTOS_GRADE_COUNTS))
  rows = []
  for label in labels:
    code = rng.bytes(6).hex()
    rows.append((code, str(label)))
  if bad_rows:
    rows.insert(5, ('0123456789ab', '2'))  # Image missing.
    rows.insert(9, ('abcdefabcdef', '7'))  # Label outside 0-4 (the image exists).
  if corrupt:
    rows.append(('deadbeefdead', '1'))
  lines = ['id_code,diagnosis']
  for row_index, (code, grade) in enumerate(rows):
    lines.append(f'{code},{grade}')
    if code == '0123456789ab':
      continue
    if code == 'deadbeefdead':
      (root / 'train_images').mkdir(parents=True, exist_ok=True)
      (root / 'train_images' / f'{code}.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
      continue
    _write_image(root / 'train_images' / f'{code}.png', id_to_level(row_index), size=(32, 28), mode='RGB')
  (root / 'train.csv').write_text('\n'.join(lines) + '\n')
  (root / 'train_images' / '._stray.png').write_bytes(b'\0')
  (root / '.DS_Store').write_bytes(b'\0')
  return root


@pytest.fixture(scope='session')
def pneumonia_dir(tmp_path_factory) -> Path:
  return make_pneumonia_folder(tmp_path_factory.mktemp('pneumonia'))


@pytest.fixture(scope='session')
def kermany_dir(tmp_path_factory) -> Path:
  return make_kermany_folder(tmp_path_factory.mktemp('kermany'))


@pytest.fixture(scope='session')
def aptos_dir(tmp_path_factory) -> Path:
  return make_aptos_folder(tmp_path_factory.mktemp('aptos'))


@pytest.fixture(scope='session')
def aptos_clean_dir(tmp_path_factory) -> Path:
  return make_aptos_folder(tmp_path_factory.mktemp('aptos_clean'), bad_rows=False)
