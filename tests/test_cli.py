"""The command line end to end: tiny runs of every mechanism, and bad input."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import run

REPO = Path(__file__).resolve().parents[1]
TINY = ['--epochs=1', '--image_size=32', '--batch_size=8', '--eval_batch_size=16',
        '--arch=tiny', '--progress=false', '--weights=none']


def _run(argv):
  try:
    return run.main(argv)
  except SystemExit as e:  # argparse errors exit directly.
    return e.code


@pytest.mark.parametrize('dataset', ['pneumonia', 'aptos'])
@pytest.mark.parametrize('mech', ['none', 'ldp', 'dpsgd'])
def test_tiny_run_writes_honest_results(tiny_data, tmp_path, dataset, mech, capsys):
  workdir = tmp_path / 'run'
  code = _run([f'--dataset={dataset}', f'--mech={mech}', '--beta=2', f'--data_dir={tiny_data[dataset]}',
               f'--workdir={workdir}', '--audit=true', *TINY])
  assert code == 0, capsys.readouterr().err
  results = json.loads((workdir / 'results.json').read_text())
  assert results['dataset'] == dataset and results['mech'] == mech and results['beta'] == 2
  assert results['data'] == str(tiny_data[dataset].resolve()) or results['data'].startswith(str(tiny_data[dataset]))
  for split in ('train', 'val', 'test'):
    assert 0.0 <= results[f'{split}_accuracy'] <= 1.0
  labels = results['test_metrics']['confusion_matrix']
  test_n = sum(map(sum, labels))
  assert results['split_sizes']['test'] == test_n
  # Majority baseline is the largest class share of the test split.
  assert results['majority_baseline'] == pytest.approx(max(map(sum, labels)) / test_n)
  assert results['pretrained'] is False
  assert results['versions']['jax'] and results['config']['seed'] == 0
  assert results['epochs'] == 1 and len(results['history']) == 1
  mia = results['audit']['membership']
  assert mia['loss_threshold']['num_members'] == results['split_sizes']['train']
  assert mia['loss_threshold']['num_nonmembers'] == results['split_sizes']['val']
  for attack in ('loss_threshold', 'class_calibrated'):
    assert 0.0 <= mia[attack]['auc'] <= 1.0
    assert mia[attack]['epsilon_lower_bound'] >= 0.0
  if mech == 'dpsgd':  # An empirical lower bound above the accountant's epsilon would be a bug.
    assert mia['loss_threshold']['epsilon_lower_bound'] <= results['epsilon']
    canaries = results['audit']['canaries']
    assert canaries['num_canaries'] == 1000 and canaries['num_guesses'] == 200
    assert 0.0 <= canaries['epsilon_lower_bound'] <= results['epsilon']
  if mech == 'ldp':
    rec = results['audit']['reconstruction']
    assert rec['images'] == 4 and rec['attack_psnr'] >= rec['released_psnr']
  if mech == 'none':
    assert results['epsilon'] is None
  elif mech == 'ldp':
    d = results['ldp']['num_pixel_values']
    assert results['epsilon'] == pytest.approx(d / 2.0)
    assert results['ldp']['per_pixel_epsilon'] == pytest.approx(0.5)
  else:
    from dpjax import accounting
    ledger = accounting.PrivacyLedger.from_dict(results['privacy_ledger'])
    assert ledger.num_steps == results['steps'] > 0
    # The reported epsilon is the ledger's, for the steps that ran, at the reported delta.
    assert results['epsilon'] == pytest.approx(ledger.epsilon(results['delta'], 'pld'))
    assert results['epsilon'] <= 0.5 + 1e-6  # Calibrated to 1/beta for the planned steps.
    assert results['delta'] == 1e-5
    assert results['neighbouring_relation'] == 'add_or_remove_one'
    assert results['noise_multiplier'] > 0


def test_demo_data_is_the_default_and_labelled(tmp_path, capsys):
  workdir = tmp_path / 'run'
  code = _run(['--dataset=pneumonia', '--mech=none', f'--workdir={workdir}', *TINY])
  assert code == 0, capsys.readouterr().err
  results = json.loads((workdir / 'results.json').read_text())
  assert results['data'] == 'demo'
  assert 'SYNTHETIC' in results['data_note']
  assert 'SYNTHETIC' in capsys.readouterr().out


BAD_INPUTS = [
    (['--dataset=mnist'], '--dataset'),
    (['--mech=laplace'], '--mech'),
    (['--beta=0'], '--beta'),
    (['--beta=-1'], '--beta'),
    (['--beta=abc'], '--beta'),
    (['--epochs=0'], '--epochs'),
    (['--no_such_flag=1'], 'no_such_flag'),
    (['--mech=dpsgd', '--norm=batch_norm'], '--norm'),
    (['--batch_size=100000'], '--batch_size'),  # Larger than the training split.
]


@pytest.mark.parametrize('argv,named', BAD_INPUTS)
def test_bad_flags_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, argv, named):
  workdir = tmp_path / 'run'
  assert _run([*TINY, *argv, f'--workdir={workdir}']) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and named in err, err
  assert not workdir.exists()


def test_bad_data_dirs_exit_2_naming_the_folder(tmp_path, capsys):
  workdir = tmp_path / 'run'
  missing = tmp_path / 'does_not_exist'
  assert _run([f'--data_dir={missing}', f'--workdir={workdir}', *TINY]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and str(missing) in err, err
  empty = tmp_path / 'empty'
  empty.mkdir()
  for dataset in ('pneumonia', 'aptos'):
    assert _run([f'--dataset={dataset}', f'--data_dir={empty}', f'--workdir={workdir}', *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(empty) in err, err
  assert not workdir.exists()


def test_real_process_exit_code_and_no_traceback(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'experiments.run', '--dataset=mnist',
                         f'--workdir={tmp_path / "run"}'], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 2
  assert 'Traceback' not in proc.stderr and '--dataset' in proc.stderr
  assert not (tmp_path / 'run').exists()


def test_clipping_groups_are_charged_twice_the_sensitivity(tiny_data, tmp_path, capsys):
  # One example moves its group's clipped gradient by up to 2C under add/remove, so with
  # Poisson sampling the ledger must charge z/2, and calibration must double z to compensate.
  workdir = tmp_path / 'run'
  code = _run(['--mech=dpsgd', '--beta=1', f'--data_dir={tiny_data["pneumonia"]}',
               f'--workdir={workdir}', '--clip_group_size=4', '--sampling=poisson', *TINY])
  assert code == 0, capsys.readouterr().err
  results = json.loads((workdir / 'results.json').read_text())
  z = results['noise_multiplier']
  assert results['accounted_noise_multiplier'] == pytest.approx(z / 2)
  assert [run[0] for run in results['privacy_ledger']['runs']] == [pytest.approx(z / 2)]
  assert results['epsilon'] <= 1.0 + 1e-6
