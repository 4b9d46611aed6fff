"""Tests for dpjax.data.folders: layouts as found on disk, errors, skip_bad."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpjax.data import folders
from dpjax.data.conftest import (APTOS_GRADE_COUNTS, KERMANY_PATIENTS, KERMANY_UNPARSED_NAME, PNEUMONIA_COUNTS,
                                 make_aptos_folder, make_pneumonia_folder)
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
