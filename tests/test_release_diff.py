"""A data set D and D without one training patient, the same command and --noise_seed: what
the published outputs show of the difference.

Every field of release/ (and every published console line) that differs must be the model, a
metric computed from it on validation or test data, or declared public information with its
reason (`experiments.results.PUBLISHED_PUBLIC_FIELDS`: the number of training units and what
derives from it, under the replace-one epsilon printed beside). Anything else, such as a count
of training images, would tell D from its neighbour outside the guarantee.
"""

import json
import shutil

import numpy as np
import pytest

from dpjax.data import datasets
from experiments import demo_data as demo
from experiments import results as results_lib
from experiments import run

COUNTS = {'train': [16, 28], 'val': [2, 2], 'test': [6, 10]}
FLAGS = ['--dataset=pneumonia', '--mech=dpsgd', '--beta=1', '--noise_seed=3', '--epochs=2',
         '--image_size=32', '--batch_size=8', '--eval_batch_size=16', '--arch=tiny',
         '--progress=false', '--weights=none', '--audit=true', '--audit_canaries=100']


def _train_patient_files(folder):
  """The training-pool files of one patient whom the split puts in train, with >= 2 images."""
  scan = datasets.scan_dataset('pneumonia', folder)
  data = datasets.load_dataset('pneumonia', folder, 32, seed=0, scan=scan, progress=False)
  names = sorted({r.patient for records in scan.splits.values() for r in records if r.patient})
  in_train, sizes = np.unique(data.train.patients, return_counts=True)
  patient = names[int(in_train[np.argmax(sizes)])]
  files = [r.path for r in scan.splits['train'] if r.patient == patient]
  assert len(files) >= 2, 'the tiny data should have a training patient with several films'
  return files


def _run(folder, workdir, capsys):
  """(results.json, release.json, the console's summary lines) of one run."""
  assert run.main([*FLAGS, f'--data_dir={folder}', f'--workdir={workdir}']) == 0
  console = capsys.readouterr().out.splitlines()
  results = json.loads((workdir / 'results.json').read_text())
  release = json.loads((workdir / 'release' / 'release.json').read_text())
  summary = results_lib.summary_lines({**results, 'workdir': str(workdir)})
  assert console[-len(summary):] == summary  # The run's last lines (data preparation first).
  return results, release, summary


@pytest.mark.slow  # Two tiny training runs: about a minute on 2 CPU cores.
def test_one_patient_removed_changes_only_the_model_and_declared_public_fields(tmp_path, capsys):
  folder = tmp_path / 'data'
  demo.write_demo_data('pneumonia', folder, seed=0, class_counts=COUNTS)
  removed = _train_patient_files(folder)
  workdir = tmp_path / 'run'  # One path for both: the config (published) is the same.
  results, release, console = _run(folder, workdir, capsys)
  shutil.move(workdir, tmp_path / 'run_with')
  for path in removed:
    path.unlink()
  results_without, release_without, console_without = _run(folder, workdir, capsys)

  # The neighbour really is D minus one training patient (curator's counts).
  assert results_without['split_patients']['train'] == results['split_patients']['train'] - 1
  assert results_without['split_patients']['val'] == results['split_patients']['val']
  assert results_without['split_sizes']['train'] == results['split_sizes']['train'] - len(removed)
  assert results['privacy_units_in_train'] == results['split_patients']['train']

  assert results_lib.undeclared_differences(release, release_without) == []
  differences = results_lib.release_differences(release, release_without)
  assert 'privacy_units_in_train' in differences  # n is published, so replace-one is printed:
  assert 0 < release['epsilon_if_seed_secret'] < release['epsilon_replace_one_if_seed_secret']
  # No image count of any split, and nothing else computed from training data, in release/.
  for field in results_lib.PRIVATE_ONLY:
    assert field not in release and field not in release_without
  assert release == results_lib.public_release(results)
  assert sorted(p.name for p in (tmp_path / 'run_with' / 'release').iterdir()) == [
      'model.msgpack', 'release.json']

  # The console: its published lines are those of release.json alone (so the check above
  # covers them); every other line is the curator's, labelled not covered.
  for lines, published in ((console, release), (console_without, release_without)):
    expected = results_lib.published_summary_lines(published)
    assert [line for line in lines if line in expected] == expected
    curator = [line for line in lines if line not in expected]
    assert curator and all('not covered' in line for line in curator), curator
  assert any('replace-one' in line for line in console)
