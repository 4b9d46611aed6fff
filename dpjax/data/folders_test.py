"""Tests for dpjax.data.folders: layouts as found on disk, errors, skip_bad."""

import os
import pickle
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpjax.data import folders
from dpjax.data.conftest import (APTOS_GRADE_COUNTS, KERMANY_PATIENTS, KERMANY_UNPARSED_NAME, PNEUMONIA_COUNTS,
                                 make_aptos_folder)
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
  # skip_bad would skip it: flagged, and the message names no flag (the application adds its hint).
  assert info.value.skippable is True and 'skip_bad' not in message and '\n' not in message


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


# The 16 file names of the official Kermany val folder, as shipped.
REAL_VAL_NAMES = {
    'NORMAL2-IM-1427-0001.jpeg': 'NORMAL2-IM-1427', 'NORMAL2-IM-1430-0001.jpeg': 'NORMAL2-IM-1430',
    'NORMAL2-IM-1431-0001.jpeg': 'NORMAL2-IM-1431', 'NORMAL2-IM-1436-0001.jpeg': 'NORMAL2-IM-1436',
    'NORMAL2-IM-1437-0001.jpeg': 'NORMAL2-IM-1437', 'NORMAL2-IM-1438-0001.jpeg': 'NORMAL2-IM-1438',
    'NORMAL2-IM-1440-0001.jpeg': 'NORMAL2-IM-1440', 'NORMAL2-IM-1442-0001.jpeg': 'NORMAL2-IM-1442',
    'person1946_bacteria_4874.jpeg': 'person1946', 'person1946_bacteria_4875.jpeg': 'person1946',
    'person1947_bacteria_4876.jpeg': 'person1947', 'person1949_bacteria_4880.jpeg': 'person1949',
    'person1950_bacteria_4881.jpeg': 'person1950', 'person1951_bacteria_4882.jpeg': 'person1951',
    'person1952_bacteria_4883.jpeg': 'person1952', 'person1954_bacteria_4886.jpeg': 'person1954',
}


def test_pneumonia_patient_id_real_names():
  for name, patient in REAL_VAL_NAMES.items():
    assert folders.pneumonia_patient_id(name) == patient, name
  assert len(set(REAL_VAL_NAMES.values())) == 15  # person1946 has two films
  assert folders.pneumonia_patient_id('IM-0115-0001.jpeg') == 'IM-0115'
  assert folders.pneumonia_patient_id('IM-0115-0002.jpeg') == 'IM-0115'
  assert folders.pneumonia_patient_id('person1_virus_6.jpeg') == 'person1'
  assert folders.pneumonia_patient_id('person1_bacteria_1.jpeg') == 'person1'  # same patient, other kind
  assert folders.pneumonia_patient_id('person1000_virus_1681.jpeg') == 'person1000'


def test_pneumonia_patient_id_variants_and_rejects():
  assert folders.pneumonia_patient_id('PERSON0012_Virus_3.JPG') == 'person12'
  assert folders.pneumonia_patient_id('normal2-im-1427-0001.PNG') == 'NORMAL2-IM-1427'
  assert folders.pneumonia_patient_id('chest_xray/train/NORMAL/IM-0001-0002.jpg') == 'IM-0001'
  for name in ('img000.jpeg', 'IM-0115.jpeg', 'person1_bacteria.jpeg', 'person_bacteria_1.jpeg',
               'person1_fungus_2.jpeg', 'IM-0115-0001.gif', 'IM-0115-0001.jpeg.txt', '', '.jpeg'):
    assert folders.pneumonia_patient_id(name) is None, name


def test_real_sample_folder_names_all_parse():
  # The real val folder, where a checkout sits next to the shared samples (<checkout>/../shared).
  folder = Path(__file__).resolve().parents[3] / 'shared' / 'samples' / 'chest_xray' / 'val'
  if not folder.is_dir():
    pytest.skip(f'no real Kermany sample folder at {folder}')
  patients = {p.name: folders.pneumonia_patient_id(p.name) for p in folder.rglob('*.jpeg')}
  assert patients and all(patients.values()), patients
  for name, patient in patients.items():
    assert REAL_VAL_NAMES.get(name, patient) == patient, name


def test_scan_assigns_patients(kermany_dir):
  scan = folders.scan_pneumonia(kermany_dir)
  assert scan.unparsed_patient_names == 1
  for split, folder in folders.PNEUMONIA_SPLITS.items():
    for label, class_name in enumerate(folders.PNEUMONIA_CLASS_NAMES):
      records = [r for r in scan.splits[split] if r.label == label]
      expected = {p: n for p, n in KERMANY_PATIENTS[folder][class_name] if p is not None}
      got = {}
      for r in records:
        got[r.patient] = got.get(r.patient, 0) + 1
      unparsed = {p: n for p, n in got.items() if p.startswith('file:')}
      assert {p: n for p, n in got.items() if p not in unparsed} == expected
      if (folder, class_name) == ('test', 'PNEUMONIA'):
        assert unparsed == {f'file:test/PNEUMONIA/{KERMANY_UNPARSED_NAME}': 1}  # its own patient
      else:
        assert unparsed == {}
  # Patient strings are global: person3 is in the train and the test folder.
  assert {r.patient for r in scan.splits['train']} & {r.patient for r in scan.splits['test']} == {'person3'}


def test_scan_unparsed_names_are_their_own_patients(pneumonia_dir):
  scan = folders.scan_pneumonia(pneumonia_dir)  # Fixture names img000.jpeg...: no patient ids.
  records = [r for split in scan.splits.values() for r in split]
  assert scan.unparsed_patient_names == len(records) == sum(map(sum, PNEUMONIA_COUNTS.values()))
  assert len({r.patient for r in records}) == len(records)
  assert records[0].patient == 'file:train/NORMAL/img000.jpeg'
  assert len(scan.notes) == 1  # The count is a field, not a note: the notes stay as they were.


def test_aptos_records_have_no_patient(aptos_clean_dir):
  scan = folders.scan_aptos(aptos_clean_dir)
  assert all(r.patient is None for r in scan.splits['labelled']) and scan.unparsed_patient_names == 0


def test_mendeley_release_names_carry_the_patient():
  # The original Mendeley/Kermany download names files <CLASS>-<patient>-<k>.
  assert folders.pneumonia_patient_id('NORMAL-1003233-0001.jpeg') == 'mendeley-1003233'
  assert folders.pneumonia_patient_id('BACTERIA-1008087-0002.jpeg') == 'mendeley-1008087'
  assert folders.pneumonia_patient_id('VIRUS-1008087-0001.jpeg') == 'mendeley-1008087'


# --- DataError.skippable ---------------------------------------------------------------------


def test_data_error_skippable_flag(tmp_path):
  assert DataError('plain').skippable is False and str(DataError('plain')) == 'plain'
  error = DataError('bad row', skippable=True)
  assert error.skippable is True and isinstance(error, ValueError)
  copy = pickle.loads(pickle.dumps(error))  # Survives crossing a process boundary.
  assert type(copy) is DataError and str(copy) == 'bad row' and copy.skippable is True
  # What skipping cannot fix is not skippable: a missing folder, a wrong layout.
  with pytest.raises(DataError) as info:
    folders.scan_pneumonia(tmp_path / 'nope')
  assert info.value.skippable is False
  with pytest.raises(DataError) as info:
    folders.scan_aptos(tmp_path)
  assert info.value.skippable is False


def test_undecodable_image_is_skippable(tmp_path):
  path = tmp_path / 'broken.png'
  path.write_bytes(b'\x89PNG\r\n\x1a\n truncated')
  with pytest.raises(DataError) as info:
    folders.load_square_image(path, 8)
  assert info.value.skippable is True and str(path) in str(info.value) and 'skip_bad' not in str(info.value)


# --- Image modes: 16-bit grey, 16-bit RGB, alpha, palette, float ------------------------------

SIDE = 64  # Gradient images are SIDE x SIDE and loaded at SIDE: no resampling, exact values.
GRADIENT16 = np.rint(np.linspace(0, 65535, SIDE)).astype(np.uint16)  # One row: 0 .. 65535.


def _exact8(values):
  """v * 255 / 65535 in float (no uint16 overflow)."""
  return np.asarray(values, np.float64) * 255 / 65535


def _write_png16(path, pixels):
  """A 16-bit PNG from uint16 [h, w] (grey), [h, w, 3] (RGB) or [h, w, 4] (RGBA): Pillow 13
  writes 16-bit grey only (no 16-bit RGB mode), so the file is put together by hand."""
  channels = 1 if pixels.ndim == 2 else pixels.shape[-1]
  color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
  height, width = pixels.shape[:2]
  raw = b''.join(b'\0' + pixels[y].astype('>u2').tobytes() for y in range(height))

  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

  path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 16, color_type, 0, 0, 0))
                   + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))


def _assert_gradient(out, exact=None):
  """``out``: uint8 [SIDE, SIDE, 3] of a horizontal gradient; every row the same, 0 .. 255."""
  assert out.shape == (SIDE, SIDE, 3) and out.dtype == np.uint8
  row = out[0, :, 0].astype(int)
  assert (out == out[:1]).all()  # every row alike
  assert row[0] == 0 and row[-1] == 255 and (np.diff(row) >= 0).all(), row
  assert abs(out.mean() - 127.5) < 1.0, out.mean()
  assert (out == 255).mean() < 0.05  # not washed out
  if exact is not None:
    np.testing.assert_array_equal(row, exact)


def test_sixteen_bit_grey_png_is_scaled_not_clipped(tmp_path):
  pixels = np.tile(GRADIENT16, (SIDE, 1))
  Image.fromarray(pixels).save(tmp_path / 'grey16.png')  # numpy uint16 -> Pillow 'I;16'
  with Image.open(tmp_path / 'grey16.png') as image:
    assert image.mode == 'I;16'  # What Pillow 13 opens a 16-bit grey PNG as.
  out = folders.load_square_image(tmp_path / 'grey16.png', SIDE)
  expected = np.rint(_exact8(GRADIENT16)).astype(int)
  _assert_gradient(out, expected)
  np.testing.assert_array_equal(out[..., 0], out[..., 1])  # grey: 3 equal channels
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  # The same file by hand (big-endian samples, as PNG stores them) and downscaled: still a ramp.
  _write_png16(tmp_path / 'grey16_by_hand.png', pixels)
  np.testing.assert_array_equal(folders.load_square_image(tmp_path / 'grey16_by_hand.png', SIDE), out)
  small = folders.load_square_image(tmp_path / 'grey16.png', 16)[0, :, 0].astype(int)
  assert (np.diff(small) > 0).all() and small[0] < 10 and small[-1] > 245


def test_sixteen_bit_tiff_modes(tmp_path):
  pixels = np.tile(GRADIENT16, (SIDE, 1))
  expected = np.rint(_exact8(GRADIENT16)).astype(int)
  Image.fromarray(pixels.astype('>u2')).save(tmp_path / 'big_endian.tiff')
  Image.fromarray(pixels.astype(np.int32)).save(tmp_path / 'int32.tiff')
  for name, mode in (('big_endian.tiff', 'I;16B'), ('int32.tiff', 'I')):
    with Image.open(tmp_path / name) as image:
      assert image.mode == mode
    _assert_gradient(folders.load_square_image(tmp_path / name, SIDE), expected)


def test_sixteen_bit_rgb_png(tmp_path):
  red = np.tile(GRADIENT16, (SIDE, 1))
  pixels = np.stack([red, red // 2, 65535 - red], axis=-1)
  _write_png16(tmp_path / 'rgb16.png', pixels)
  with Image.open(tmp_path / 'rgb16.png') as image:
    assert image.mode == 'RGB'  # Pillow 13 opens 16-bit RGB as 8-bit RGB: the high byte of each sample.
  out = folders.load_square_image(tmp_path / 'rgb16.png', SIDE)
  _assert_gradient(out[..., :1].repeat(3, axis=-1))  # red: 0 .. 255
  np.testing.assert_array_equal(out[0, :, 0], GRADIENT16 >> 8)  # within 1 of v * 255 / 65535
  assert np.abs(out[0, :, 0] - _exact8(GRADIENT16)).max() <= 1
  assert np.abs(out[0, :, 1] - _exact8(GRADIENT16 // 2)).max() <= 1
  assert np.abs(out[0, :, 2] - _exact8(65535 - GRADIENT16)).max() <= 1
  _write_png16(tmp_path / 'rgba16.png', np.concatenate([pixels, np.full_like(red, 65535)[..., None]], axis=-1))
  np.testing.assert_array_equal(folders.load_square_image(tmp_path / 'rgba16.png', SIDE), out)


def test_alpha_palette_bilevel_and_cmyk_images_load_as_their_rgb(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
  alpha = rng.integers(0, 256, (SIDE, SIDE, 1), dtype=np.uint8)
  Image.fromarray(np.concatenate([rgb, alpha], axis=-1)).save(tmp_path / 'rgba.png')
  np.testing.assert_array_equal(folders.load_square_image(tmp_path / 'rgba.png', SIDE), rgb)  # alpha dropped
  grey = rgb[..., 0]
  Image.fromarray(np.stack([grey, alpha[..., 0]], axis=-1)).save(tmp_path / 'la.png')
  np.testing.assert_array_equal(folders.load_square_image(tmp_path / 'la.png', SIDE), np.stack([grey] * 3, -1))
  palette_image = Image.fromarray(rgb).quantize(colors=16)
  palette_image.save(tmp_path / 'palette.png')
  with Image.open(tmp_path / 'palette.png') as image:
    assert image.mode == 'P'
    expected = np.asarray(image.convert('RGB'))
  assert len(np.unique(expected.reshape(-1, 3), axis=0)) > 1
  np.testing.assert_array_equal(folders.load_square_image(tmp_path / 'palette.png', SIDE), expected)
  palette_image.save(tmp_path / 'palette_transparent.png', transparency=0)  # tRNS chunk
  with Image.open(tmp_path / 'palette_transparent.png') as image:
    assert image.mode == 'P' and 'transparency' in image.info
  np.testing.assert_array_equal(folders.load_square_image(tmp_path / 'palette_transparent.png', SIDE), expected)
  # 'PA' (Pillow writes no file in this mode): the conversion step itself.
  converted = folders._as_l_or_rgb(palette_image.convert('PA'), 'in memory')  # pylint: disable=protected-access
  assert converted.mode == 'RGB'
  np.testing.assert_array_equal(np.asarray(converted), expected)
  bits = grey > 127
  Image.fromarray(bits).save(tmp_path / 'bilevel.png')
  with Image.open(tmp_path / 'bilevel.png') as image:
    assert image.mode == '1'
  np.testing.assert_array_equal(folders.load_square_image(tmp_path / 'bilevel.png', SIDE),
                                np.stack([bits * 255] * 3, -1).astype(np.uint8))
  Image.fromarray(rgb).convert('CMYK').save(tmp_path / 'cmyk.jpeg', quality=100)
  with Image.open(tmp_path / 'cmyk.jpeg') as image:
    assert image.mode == 'CMYK'
    expected = np.asarray(image.convert('RGB'))
  np.testing.assert_array_equal(folders.load_square_image(tmp_path / 'cmyk.jpeg', SIDE), expected)
  assert np.abs(expected.astype(int) - rgb).mean() < 10  # really the picture, in RGB


@pytest.mark.parametrize('name, pixels, mode', [
    ('float.tiff', np.tile(np.linspace(0, 1, SIDE, dtype=np.float32), (SIDE, 1)), 'F'),
    ('negative.tiff', np.tile(np.arange(SIDE, dtype=np.int32) - 1, (SIDE, 1)), 'I'),
    ('wide.tiff', np.tile(np.arange(SIDE, dtype=np.int32) * 2000, (SIDE, 1)), 'I'),
    # A float TIFF under a .png name (the scanners pick files by extension): refused all the same.
    ('float_really_tiff.png', np.ones((SIDE, SIDE), np.float32), 'F'),
])
def test_float_and_out_of_range_images_are_refused(tmp_path, name, pixels, mode):
  path = tmp_path / name
  Image.fromarray(pixels).save(path, format='TIFF')
  with Image.open(path) as image:
    assert image.mode == mode
  with pytest.raises(DataError) as info:
    folders.load_square_image(path, 16)
  message = str(info.value)
  assert str(path) in message and f"mode '{mode}'" in message and '\n' not in message, message
  assert info.value.skippable is True


# --- APTOS train.csv as Excel saves it ------------------------------------------------------


def _rewrite_csv(root, *, bom=False, crlf=False):
  text = (root / 'train.csv').read_text()
  data = text.replace('\n', '\r\n') if crlf else text
  (root / 'train.csv').write_bytes((b'\xef\xbb\xbf' if bom else b'') + data.encode())


@pytest.mark.parametrize('bom, crlf', [(True, False), (False, True), (True, True)])
def test_aptos_csv_with_bom_and_crlf(tmp_path, aptos_clean_dir, bom, crlf):
  expected = folders.scan_aptos(aptos_clean_dir).splits['labelled']
  root = tmp_path / 'aptos'
  shutil.copytree(aptos_clean_dir, root)
  _rewrite_csv(root, bom=bom, crlf=crlf)
  assert (root / 'train.csv').read_bytes().startswith(b'\xef\xbb\xbfid_code,' if bom else b'id_code,')
  records = folders.scan_aptos(root).splits['labelled']
  assert [(r.path.name, r.label, r.example_id) for r in records] == [
      (r.path.name, r.label, r.example_id) for r in expected]
  assert len(records) == sum(APTOS_GRADE_COUNTS)


def test_aptos_csv_not_utf8_names_the_file(tmp_path):
  root = make_aptos_folder(tmp_path, bad_rows=False)
  (root / 'train.csv').write_bytes('id_code,diagnosis\nabc\xe9,1\n'.encode('latin-1'))
  with pytest.raises(DataError, match='train.csv is not UTF-8 text'):
    folders.scan_aptos(root)


# --- Content fingerprint ----------------------------------------------------------------------


def test_content_fingerprint_follows_the_data_not_the_location(tmp_path, kermany_dir):
  root = tmp_path / 'data'
  shutil.copytree(kermany_dir, root, copy_function=shutil.copy2)
  original = folders.scan_pneumonia(root).content_fingerprint()
  assert len(original) == 64 and int(original, 16) >= 0
  assert folders.scan_pneumonia(root).content_fingerprint() == original  # deterministic
  assert folders.scan_pneumonia(root / 'chest_xray').content_fingerprint() == original  # entry point

  # The whole folder copied (timestamps kept) or moved elsewhere: the same data.
  shutil.copytree(root, tmp_path / 'copy', copy_function=shutil.copy2)
  copied = folders.scan_pneumonia(tmp_path / 'copy')
  assert copied.content_fingerprint() == original
  assert copied.fingerprint() != folders.scan_pneumonia(root).fingerprint()  # the cache key does move
  (tmp_path / 'copy').rename(tmp_path / 'moved')
  assert folders.scan_pneumonia(tmp_path / 'moved').content_fingerprint() == original

  seen = {original}

  def changed():
    fingerprint = folders.scan_pneumonia(root).content_fingerprint()
    assert fingerprint not in seen
    seen.add(fingerprint)

  normal, pneumonia = root / 'chest_xray' / 'train' / 'NORMAL', root / 'chest_xray' / 'train' / 'PNEUMONIA'
  # Moving an image from NORMAL to PNEUMONIA (same name, size and mtime): a label changes.
  moved = sorted(normal.iterdir())[0]
  moved.rename(pneumonia / moved.name)
  changed()
  # Adding an image.
  shutil.copy2(pneumonia / moved.name, normal / 'IM-9999-0001.jpeg')
  changed()
  # Touching one (a new mtime only).
  target = sorted(pneumonia.iterdir())[3]
  stat = target.stat()
  os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
  changed()
  # Changing a byte count (size; the mtime put back).
  stat = target.stat()
  target.write_bytes(target.read_bytes() + b'\0')
  os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  changed()


def test_content_fingerprint_aptos_labels(tmp_path, aptos_clean_dir):
  root = tmp_path / 'aptos'
  shutil.copytree(aptos_clean_dir, root, copy_function=shutil.copy2)
  original = folders.scan_aptos(root).content_fingerprint()
  lines = (root / 'train.csv').read_text().splitlines()
  code, grade = lines[1].split(',')
  lines[1] = f'{code},{(int(grade) + 1) % 5}'  # One relabelled image: the image files are untouched.
  (root / 'train.csv').write_text('\n'.join(lines) + '\n')
  assert folders.scan_aptos(root).content_fingerprint() != original


def test_content_fingerprint_is_fast_on_5000_files(tmp_path):
  # 5,000 files as the scanner lists them (tiny files: only stat() is timed, no image is read).
  records = []
  for i in range(5000):
    folder = tmp_path / ('NORMAL' if i % 3 else 'PNEUMONIA')
    folder.mkdir(exist_ok=True)
    path = folder / f'person{i}_virus_{i}.jpeg'
    path.write_bytes(b'x' * (i % 97))
    records.append(folders.ImageRecord(path, int(i % 3 == 0), i, f'person{i}'))
  scan = folders.FolderScan('pneumonia', tmp_path, {'train': records[:4000], 'test': records[4000:]},
                            folders.PNEUMONIA_CLASS_NAMES)
  start = time.perf_counter()
  fingerprint = scan.content_fingerprint()
  elapsed = time.perf_counter() - start
  print(f'content_fingerprint of 5,000 files: {elapsed * 1000:.1f} ms')
  assert len(fingerprint) == 64 and elapsed < 2.0, elapsed


def _one_line_data_error(call, *must_contain, skippable=None):
  with pytest.raises(DataError) as info:
    call()
  message = str(info.value)
  assert '\n' not in message, message
  for text in must_contain:
    assert str(text) in message, message
  if skippable is not None:
    assert info.value.skippable is skippable
  return info.value


def test_symlink_loops_and_dangling_links_are_named_in_one_line(pneumonia_dir, tmp_path):
  data = tmp_path / 'data'
  shutil.copytree(pneumonia_dir, data, symlinks=True)
  shutil.rmtree(data / 'chest_xray' / 'chest_xray', ignore_errors=True)  # No fallback copy.
  normal = data / 'chest_xray' / 'train' / 'NORMAL'
  os.symlink('loop_b.jpeg', normal / 'loop_a.jpeg')
  os.symlink('loop_a.jpeg', normal / 'loop_b.jpeg')
  _one_line_data_error(lambda: folders.scan_pneumonia(data), normal / 'loop_a.jpeg',
                       'symbolic link loop', skippable=True)
  scan = folders.scan_pneumonia(data, skip_bad=True)  # Skipped and listed instead.
  assert len(scan.skipped) == 2 and all('symbolic link loop' in s for s in scan.skipped)
  assert scan.fingerprint() and scan.content_fingerprint()
  for link in ('loop_a.jpeg', 'loop_b.jpeg'):
    (normal / link).unlink()

  os.symlink(tmp_path / 'gone.jpeg', normal / 'dangling.jpeg')
  _one_line_data_error(lambda: folders.scan_pneumonia(data), normal / 'dangling.jpeg',
                       'which does not exist', skippable=True)
  (normal / 'dangling.jpeg').unlink()

  # A looping class folder, and a looping data folder.
  shutil.rmtree(normal)
  os.symlink(normal.parent / 'OTHER', normal)
  os.symlink(normal, normal.parent / 'OTHER')
  _one_line_data_error(lambda: folders.scan_pneumonia(data), normal, 'symbolic link loop')
  os.symlink(tmp_path / 'loop2', tmp_path / 'loop1')
  os.symlink(tmp_path / 'loop1', tmp_path / 'loop2')
  _one_line_data_error(lambda: folders.scan_pneumonia(tmp_path / 'loop1'), tmp_path / 'loop1',
                       'symbolic link loop')


def test_aptos_looping_image_link_is_a_bad_row(aptos_dir, tmp_path):
  data = tmp_path / 'aptos'
  shutil.copytree(aptos_dir, data, symlinks=True)
  first = folders.scan_aptos(data, skip_bad=True).splits['labelled'][0].path
  first.unlink()
  os.symlink(first.name, first)  # Points at itself.
  scan = folders.scan_aptos(data, skip_bad=True)
  assert any(str(first) in s and 'symbolic link loop' in s for s in scan.skipped)
  assert first not in [r.path for r in scan.splits['labelled']]


def test_an_unreadable_class_folder_is_named(pneumonia_dir, tmp_path, monkeypatch):
  data = tmp_path / 'data'
  shutil.copytree(pneumonia_dir, data, symlinks=True)
  locked = data / 'chest_xray' / 'test' / 'PNEUMONIA'
  real_scandir = os.scandir

  def scandir(path='.'):
    if Path(path) == locked.resolve() or Path(path) == locked:
      raise PermissionError(13, 'Permission denied', str(path))
    return real_scandir(path)

  monkeypatch.setattr(folders.os, 'scandir', scandir)  # Root ignores chmod 0.
  _one_line_data_error(lambda: folders.scan_pneumonia(data), 'Cannot read folder', 'PNEUMONIA',
                       'Permission denied')
