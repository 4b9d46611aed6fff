"""What the processes of a job compare (the job itself: tests/test_multihost.py)."""

import os
import shutil

import pytest

from dpjax.data import datasets
from dpjax.data import folders
from experiments import consistency
from experiments import demo_data

COUNTS = {'train': [6, 10], 'val': [2, 2], 'test': [3, 3]}
SALT = bytes(range(32))


@pytest.fixture(scope='module')
def pneumonia(tmp_path_factory):
  root = tmp_path_factory.mktemp('consistency') / 'pneumonia'
  demo_data.write_demo_data('pneumonia', root, seed=0, class_counts=COUNTS)
  return root


def _digest(folder, salt=SALT):
  return consistency.data_digest(datasets.scan_dataset('pneumonia', folder), salt)


def test_job_settings_compare_the_data_folder_by_presence_only():
  fingerprint = {'l2_norm_clip': 1.0, 'data_dir': '/data/host0/chest_xray', 'weights': 'none'}
  settings = consistency.job_settings(fingerprint)
  assert settings == {'l2_norm_clip': 1.0, 'data_dir': True, 'weights': 'none'}
  assert consistency.job_settings({**fingerprint, 'data_dir': '/scratch/x'}) == settings
  assert consistency.job_settings({**fingerprint, 'data_dir': ''})['data_dir'] is False


def test_a_copy_elsewhere_with_other_file_times_is_the_same_data(pneumonia, tmp_path):
  copy = tmp_path / 'elsewhere'
  shutil.copytree(pneumonia, copy, copy_function=shutil.copyfile)  # New modification times.
  for path in copy.rglob('*.jpeg'):
    os.utime(path, (1, 1))
  assert _digest(copy) == _digest(pneumonia)
  assert _digest(pneumonia, bytes(32)) != _digest(pneumonia)  # Keyed with the run's salt.


def test_one_patient_fewer_or_a_moved_image_are_other_data(pneumonia, tmp_path):
  fewer = tmp_path / 'fewer'
  shutil.copytree(pneumonia, fewer)
  train = sorted((fewer / 'chest_xray' / 'train' / 'PNEUMONIA').glob('*.jpeg'))
  patient = folders.pneumonia_patient_id(train[0].name)
  for path in fewer.rglob('*.jpeg'):
    if folders.pneumonia_patient_id(path.name) == patient:
      path.unlink()
  assert _digest(fewer) != _digest(pneumonia)
  moved = tmp_path / 'moved'
  shutil.copytree(pneumonia, moved)
  image = sorted((moved / 'chest_xray' / 'train' / 'NORMAL').glob('*.jpeg'))[0]
  image.rename(moved / 'chest_xray' / 'train' / 'PNEUMONIA' / image.name)
  assert _digest(moved) != _digest(pneumonia)


def test_one_process_compares_nothing(pneumonia):
  consistency.check_same_settings({'l2_norm_clip': 1.0})
  consistency.check_same_data(datasets.scan_dataset('pneumonia', pneumonia), SALT)
