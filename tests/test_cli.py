"""The command line end to end: tiny runs of every mechanism, and bad input."""

import json
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
  release, uncovered = results['release'], results['not_covered']
  assert results['dataset'] == dataset and results['mech'] == mech and results['beta'] == 2
  assert results['data'] == str(tiny_data[dataset].resolve()) or results['data'].startswith(str(tiny_data[dataset]))
  assert 0.0 <= uncovered['train_accuracy'] <= 1.0
  for split in ('val', 'test'):
    assert 0.0 <= release[f'{split}_accuracy'] <= 1.0
  labels = release['test_metrics']['confusion_matrix']
  test_n = sum(map(sum, labels))
  assert results['split_sizes']['test'] == test_n
  # Majority baseline is the largest class share of the test split.
  assert release['majority_baseline'] == pytest.approx(max(map(sum, labels)) / test_n)
  assert results['pretrained'] is False
  assert results['versions']['jax'] and results['config']['seed'] == 0
  assert results['epochs'] == 1 and len(release['history']) == 1
  # Only covered statistics in the release; everything from training examples is labelled.
  # Validation scores are released (post-processing on non-training data): the threshold-free
  # one too, ROC AUC for pneumonia, quadratic weighted kappa for the graded APTOS.
  score = 'val_roc_auc' if dataset == 'pneumonia' else 'val_quadratic_weighted_kappa'
  assert set(release['history'][0]) == {'epoch', 'step', 'learning_rate', 'val_loss',
                                        'val_accuracy', 'val_balanced_accuracy', score,
                                        'epsilon'} - ({'epsilon'} if mech != 'dpsgd' else set())
  assert {'train_loss', 'train_accuracy', 'mean_batch_images'} <= set(uncovered['history'][0])
  if mech == 'dpsgd':
    assert {'fraction_clipped', 'mean_grad_norm', 'mean_batch_units'} <= set(uncovered['history'][0])
  assert 'NOT covered' in uncovered['note']
  for leaked in ('train_accuracy', 'fraction_clipped', 'mean_grad_norm', 'membership'):
    assert leaked not in json.dumps(release), leaked
  assert (workdir / release['model_file']).stat().st_size > 0
  # DP-SGD protects patients where file names give them; LDP protects images; none nothing.
  unit = {'none': None, 'ldp': 'image'}.get(mech, 'patient' if dataset == 'pneumonia' else 'image')
  assert results['privacy_unit'] == unit
  assert results['private_randomness']['source'] == 'os_entropy'
  mia = uncovered['audit']['membership']
  assert mia['loss_threshold']['num_members'] == results['split_sizes']['train']
  # Non-members: the test split (never used for selection), less images of training patients.
  assert mia['loss_threshold']['num_nonmembers'] == (results['split_sizes']['test']
                                                     - mia['nonmembers_left_out'])
  assert mia['nonmembers'].startswith('test split')
  for attack in ('loss_threshold', 'class_calibrated'):
    assert 0.0 <= mia[attack]['auc'] <= 1.0
    assert 0.0 <= mia[attack]['epsilon_lower_bound'] <= mia[attack]['epsilon_lower_bound_max']
  if mech == 'dpsgd':  # An empirical lower bound above the accountant's epsilon would be a bug.
    assert mia['loss_threshold']['epsilon_lower_bound'] <= results['epsilon']
    canaries = release['audit']['canaries']
    assert canaries['num_canaries'] == 1000 and canaries['num_guesses'] == 200
    assert 0.0 <= canaries['epsilon_lower_bound'] <= results['epsilon']
    # Beside the bound, the most it could show; epsilon 0.5 is within reach, so it is tested.
    assert canaries['epsilon_lower_bound_max'] == pytest.approx(4.17, abs=0.005)
    assert canaries['claimed_epsilon'] == results['epsilon'] and canaries['can_test_claim']
    assert canaries['verdict'].startswith('consistent')
    assert 'at most 4.17 attainable' in capsys.readouterr().out
  if mech == 'ldp':
    rec = uncovered['audit']['reconstruction']
    assert rec['images'] == 4 and rec['attack_psnr'] >= rec['released_psnr']
  if mech == 'none':
    assert results['epsilon'] is None
  elif mech == 'ldp':
    side = results['ldp']['image_shape'][0]
    # Grey X-rays: one noisy value per pixel (H*W); colour fundus photos: H*W*3.
    d = side * side * (1 if dataset == 'pneumonia' else 3)
    assert results['ldp']['num_pixel_values'] == d
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
    assert results['privacy_units_in_train'] == (
        uncovered['data']['patients']['per_split']['train']['patients']
        if unit == 'patient' else results['split_sizes']['train'])
    assert ("each patient's images" in results['guarantee']) == (unit == 'patient')


def test_demo_data_is_the_default_and_labelled(tmp_path, capsys):
  workdir = tmp_path / 'run'
  code = _run(['--dataset=pneumonia', '--mech=none', f'--workdir={workdir}', *TINY])
  assert code == 0, capsys.readouterr().err
  results = json.loads((workdir / 'results.json').read_text())
  assert results['data'] == 'demo'
  assert 'SYNTHETIC' in results['data_note']
  out = capsys.readouterr().out
  assert 'SYNTHETIC' in out and 'not covered' in out


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
    (['--arch=resnet50'], '--arch'),
    (['--arch=resnet8', '--weights=imagenet'], '--weights=none'),  # ImageNet's are resnet18's.
    # Below calibration's floor: no privacy, and near 0 the PLD accountant ran out of memory.
    (['--mech=dpsgd', '--noise_multiplier=0.0001'], '--noise_multiplier'),
    (['--mech=dpsgd', '--noise_multiplier=0.29'], '--noise_multiplier'),
    (['--mech=dpsgd', '--noise_multiplier=nan'], '--noise_multiplier'),
    (['--split_seed=-1'], '--split_seed'),
    # Reliability round 3: each of these once ended in a traceback or ran to the end.
    (['--seed=1180591620717411303424'], '--seed'),  # 2**70 overflowed inside JAX.
    (['--split_seed=4294967296'], '--split_seed'),
    (['--noise_seed=4294967296'], '--noise_seed'),
    (['--mech=dpsgd', '--epsilon=nan'], '--epsilon'),
    (['--mech=dpsgd', '--epsilon=inf'], '--epsilon'),
    (['--mech=dpsgd', '--delta=1e-300'], '--delta'),  # No noise multiplier reaches it.
    (['--mech=dpsgd', '--l2_norm_clip=nan'], '--l2_norm_clip'),
    (['--mech=dpsgd', '--l2_norm_clip=inf'], '--l2_norm_clip'),
    (['--mech=dpsgd', '--audit=true', '--audit_canaries=0'], '--audit_canaries'),
    (['--mech=dpsgd', '--audit=true', '--audit_canaries=-5'], '--audit_canaries'),
    (['--learning_rate=-1'], '--learning_rate'),  # Gradient ascent to the end, exit 0.
    (['--learning_rate=nan'], '--learning_rate'),
    (['--momentum=nan'], '--momentum'),
    (['--momentum=1'], '--momentum'),
    (['--weight_decay=nan'], '--weight_decay'),
    (['--mech=dpsgd', '--noise_multiplier=1e300'], 'noise std'),  # Said "lower --learning_rate".
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


def test_clip_groups_under_poisson_sampling_are_refused(tiny_data, tmp_path, capsys):
  # Groups are consecutive rows of a sampled batch: one added example regroups every later
  # example, so no 2C bound holds (a direct test moved the clipped sum by 15C). Refused.
  workdir = tmp_path / 'run'
  code = _run(['--mech=dpsgd', '--beta=1', f'--data_dir={tiny_data["pneumonia"]}',
               f'--workdir={workdir}', '--clip_group_size=4', '--sampling=poisson', *TINY])
  assert code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and '--clip_group_size' in err and 'poisson' in err
  assert not workdir.exists()


def test_noise_multiplier_floor_is_calibrations_and_binds_dp_sgd_only():
  from dpjax import accounting
  from experiments import config_checks
  from experiments.configs import default
  config = default.preset()
  config.update(mech='dpsgd', noise_multiplier=accounting.MIN_NOISE_MULTIPLIER)
  config_checks.validate_config(config)  # The floor itself is allowed.
  config.update(mech='none', noise_multiplier=0.1)
  config_checks.validate_config(config)  # No DP-SGD, no floor.
  config.update(mech='dpsgd')
  with pytest.raises(config_checks.ConfigError, match='essentially no privacy'):
    config_checks.validate_config(config)


HEAVY_MODULES = ('jax', 'jaxlib', 'flax', 'tensorflow', 'tensorflow_datasets')


@pytest.mark.parametrize('module', ['experiments.run', 'experiments.grid'])
def test_help_is_generated_and_imports_no_jax(module):
  # In a fresh process, as a user runs it: --help must stay instant (no JAX or TFDS import).
  code = ('import runpy, sys\n'
          f'sys.argv = ["{module}", "--help"]\n'
          'try:\n'
          f'  runpy.run_module("{module}", run_name="__main__")\n'
          'except SystemExit as e:\n'
          '  assert e.code in (0, None), e.code\n'
          f'heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY_MODULES!r})\n'
          'sys.stderr.write(f"HEAVY={heavy}\\n")\n')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert 'HEAVY=[]' in proc.stderr, proc.stderr
  text = ' '.join(proc.stdout.split())  # Unwrapped.
  if module == 'experiments.run':
    assert 'Passes over the training split' in text  # --epochs' comment.
    assert 'Default: 50 (demo data: 10).' in text
    assert 'Choices: none, ldp, dpsgd.' in text
    assert 'Choices: auto, val_loss, val_auc, val_balanced_accuracy, val_kappa, last.' in text
    assert 'resnet18, resnet8, tiny, scatternet, scatternet_cnn' in text
  else:
    assert 'resnet18, resnet8, tiny, scatternet, scatternet_cnn' in text
    assert 'pneumonia, aptos, both' in text
