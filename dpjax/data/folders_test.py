"""Tests for dpjax.data.folders: layouts as found on disk, errors, skip_bad."""

import numpy as np
import pytest
from PIL import Image

from dpjax.data import folders
from dpjax.data.conftest import APTOS_GRADE_COUNTS, PNEUMONIA_COUNTS, make_aptos_folder, make_pneumonia_folder
from dpjax.data.folders import DataError


def _counts(records):
  return np.bincount([r.label for r in records], minlength=2).tolist()


@pytest.mark.parametrize('subdir', ['', 'chest_xray', 'chest_xray/chest_xray'])
def test_pneumonia_layouts_counted_once(pneumonia_dir, subdir):
  scan = folders.scan_pneumonia(pneumonia_dir / subdir if subdir else pneumonia_dir)
  assert _counts(scan.splits['train']) == list(PNEUMONIA_COUNTS['train'])
  assert _counts(scan.splits['official_val']) == list(PNEUMONIA_COUNTS['val'])
  assert _counts(scan.splits['test']) == list(PNEUMONIA_COUNTS['test'])
  all_records = [r for split in scan.splits.values() for r in split]
  names = [r.path.name for r in all_records]
  assert not any(n.startswith('.') for n in names)  # ._x.jpeg and .DS_Store ignored
  assert not any('__MACOSX' in str(r.path) for r in all_records)
  ids = [r.example_id for r in all_records]
  assert ids == list(range(len(all_records)))  # unique, stable, listing order
  if subdir != 'chest_xray/chest_xray':  # Both copies visible: outer used, and said so.
    assert scan.root == (pneumonia_dir / 'chest_xray').resolve()
    assert len(scan.notes) == 1 and 'nested duplicate' in scan.notes[0]
  else:
    assert scan.notes == []


def test_pneumonia_ids_stable_across_entry_points(pneumonia_dir):
  a = folders.scan_pneumonia(pneumonia_dir)
  b = folders.scan_pneumonia(pneumonia_dir / 'chest_xray')
  assert [(r.path, r.label, r.example_id) for r in a.splits['test']] == [
      (r.path, r.label, r.example_id) for r in b.splits['test']]
  assert a.fingerprint() == b.fingerprint()


def test_missing_folder_and_wrong_layout(tmp_path):
  with pytest.raises(DataError, match=f'{tmp_path / "nope"}.*does not exist'):
    folders.scan_pneumonia(tmp_path / 'nope')
  (tmp_path / 'chest_xray' / 'train' / 'NORMAL').mkdir(parents=True)
  with pytest.raises(DataError, match='has no chest X-ray layout') as info:
    folders.scan_pneumonia(tmp_path)
  assert str(tmp_path) in str(info.value) and '\n' not in str(info.value)
  with pytest.raises(DataError, match='lacks train.csv'):
    folders.scan_aptos(tmp_path)


def test_pneumonia_empty_class_folder(tmp_path):
  for split in ('train', 'test'):
    for cls in folders.PNEUMONIA_CLASS_NAMES:
      (tmp_path / split / cls).mkdir(parents=True)
  with pytest.raises(DataError, match='No images in .*train/NORMAL'):
    folders.scan_pneumonia(tmp_path)


def test_aptos_bad_rows_raise_naming_the_file(aptos_dir):
  with pytest.raises(DataError) as info:
    folders.scan_aptos(aptos_dir)
  message = str(info.value)
  assert 'train.csv row 7' in message and '0123456789ab.png not found' in message
  assert 'skip_bad=True' in message


def test_aptos_label_out_of_range_raises(tmp_path):
  root = make_aptos_folder(tmp_path, bad_rows=False)
  lines = (root / 'train.csv').read_text().splitlines()
  code = lines[3].split(',')[0]
  lines[3] = f'{code},7'
  (root / 'train.csv').write_text('\n'.join(lines) + '\n')
  with pytest.raises(DataError, match=f"row 4: diagnosis '7' for .*{code}.png is not an integer grade 0-4"):
    folders.scan_aptos(root)
  lines[3] = f'{code},2.5'
  (root / 'train.csv').write_text('\n'.join(lines) + '\n')
  with pytest.raises(DataError, match="diagnosis '2.5'"):
    folders.scan_aptos(root)


def test_aptos_skip_bad_counts_and_ids(aptos_dir):
  scan = folders.scan_aptos(aptos_dir, skip_bad=True)
  records = scan.splits['labelled']
  assert len(scan.skipped) == 2
  assert 'not found' in scan.skipped[0] and "diagnosis '7'" in scan.skipped[1]
  assert np.bincount([r.label for r in records], minlength=5).tolist() == list(APTOS_GRADE_COUNTS)
  # Ids are CSV data-row indices: the skipped rows 5 and 9 leave gaps.
  ids = [r.example_id for r in records]
  assert 5 not in ids and 9 not in ids and len(set(ids)) == len(ids) == sum(APTOS_GRADE_COUNTS)


def test_aptos_header_checked(tmp_path):
  root = make_aptos_folder(tmp_path, bad_rows=False)
  (root / 'train.csv').write_text('image,level\nabc,1\n')
  with pytest.raises(DataError, match='needs the header id_code,diagnosis'):
    folders.scan_aptos(root)


def test_load_square_image_resize_and_crop(tmp_path):
  # 40 wide x 20 high, left half black, right half white; shorter side to 10 -> 20 x 10.
  pixels = np.zeros((20, 40), np.uint8)
  pixels[:, 20:] = 255
  Image.fromarray(pixels).save(tmp_path / 'a.png')
  out = folders.load_square_image(tmp_path / 'a.png', 10)
  assert out.shape == (10, 10, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[..., 0], out[..., 1])  # grayscale -> 3 equal channels
  # Resized to 20x10; the centre crop (columns 5..14) spans the edge at column 10.
  assert (out[:, :4] == 0).all() and (out[:, 6:] == 255).all()


def test_load_square_image_corrupt_names_file(tmp_path):
  path = tmp_path / 'broken.jpeg'
  path.write_bytes(b'\xff\xd8\xff\xe0 garbage')
  with pytest.raises(DataError, match=f'Cannot decode image {path}'):
    folders.load_square_image(path, 8)
