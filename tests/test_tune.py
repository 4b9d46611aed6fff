"""`python -m experiments.tune` end to end on tiny data: one accounted epsilon, resume, bad input."""

import json
import re
import stat

import pytest

from dpjax import accounting
from dpjax import tuning
from experiments import train
from experiments import tune

TINY = ['--arch=scatternet', '--set', 'epochs=2', '--set', 'image_size=32', '--set',
        'batch_size=8', '--set', 'microbatch_size=8', '--set', 'eval_batch_size=16',
        '--set', 'progress=false']


def _argv(tiny_data, workdir, *extra):
  return [f'--data_dir={tiny_data["pneumonia"]}', f'--workdir={workdir}', '--epsilon=2',
          "--search=learning_rate=0.05,0.1;l2_norm_clip=0.5,1", '--eta=1', '--gamma=0.5',
          *TINY, *extra]


def test_tuned_search_prints_one_covered_epsilon_and_resumes_without_redrawing(
    tiny_data, tmp_path, monkeypatch, capsys):
  draws = []

  def two_runs(*args, **kwargs):  # The test fixes K (the real draw is tested in dpjax).
    draws.append((args, kwargs))
    return 2

  monkeypatch.setattr(tuning, 'draw_num_runs', two_runs)
  workdir = tmp_path / 'tune'
  real_train = train.train_and_evaluate
  started = []

  def killed_after_one_run(config):
    started.append(config.workdir)
    if len(started) == 2:
      raise KeyboardInterrupt  # A kill during the second run.
    return real_train(config)

  monkeypatch.setattr(train, 'train_and_evaluate', killed_after_one_run)
  with pytest.raises(KeyboardInterrupt):
    tune.main(_argv(tiny_data, workdir))
  state_path = workdir / tune.STATE_FILE
  state = json.loads(state_path.read_text())
  assert state['num_runs'] == 2 and len(draws) == 1
  assert stat.S_IMODE(state_path.stat().st_mode) == 0o600
  first_results = json.loads((workdir / 'runs' / 'run_000' / 'results.json').read_text())

  reused = []

  def counting(config):
    result = real_train(config)
    reused.append(bool(result.get('reused')))
    return result

  monkeypatch.setattr(train, 'train_and_evaluate', counting)
  capsys.readouterr()
  assert tune.main(_argv(tiny_data, workdir)) == 0
  out = capsys.readouterr().out
  assert len(draws) == 1  # Resumed: K and the configurations were not drawn again.
  assert json.loads(state_path.read_text()) == state
  assert reused[0]  # The finished run was reused, not retrained.
  assert json.loads((workdir / 'runs' / 'run_000' / 'results.json').read_text()
                    )['release'] == first_results['release']

  (line,) = [text for text in out.splitlines() if text.startswith('tuned release:')]
  assert len(re.findall(r'epsilon', line)) == 1
  printed = float(re.search(r'epsilon ([0-9.e+-]+)', line).group(1))
  assert printed <= 2
  release = json.loads((workdir / 'release' / tune.RELEASE_FILE).read_text())
  assert release['epsilon'] <= 2 and printed == pytest.approx(release['epsilon'], rel=1e-5)
  # Recomputed from the release's recorded per-run ledgers and distribution: the same number.
  ledgers = [accounting.PrivacyLedger.from_dict(d) for d in release['per_run_ledgers']]
  law = release['distribution']
  assert tuning.tuned_epsilon(ledgers, release['delta'], **law) == release['epsilon']
  # Every run recorded exactly the ledger accounted for.
  for i in range(2):
    results = json.loads((workdir / 'runs' / f'run_{i:03d}' / 'results.json').read_text())
    assert results['privacy_ledger'] in release['per_run_ledgers']
  # The release holds no K and no scores; the curator file does, 0600.
  text = json.dumps(release)
  assert 'num_runs' not in text and 'scores' not in text
  assert release['chosen'] in state['configurations']
  assert (workdir / 'release' / 'model.msgpack').exists()
  not_covered = workdir / tune.NOT_COVERED_FILE
  assert stat.S_IMODE(not_covered.stat().st_mode) == 0o600
  assert json.loads(not_covered.read_text())['num_runs'] == 2
  # The run folders (their count is K) are the curator's; the copied release speaks of the
  # tuned guarantee, never of one run's smaller epsilon.
  assert stat.S_IMODE((workdir / 'runs').stat().st_mode) == 0o700
  assert f'{release["epsilon"]:.6g}' in release['release']['covered_by']
  assert all('epsilon' not in record for record in release['release']['history'])
  assert 'done' in out and '/2' not in out


def test_a_diverged_run_scores_worst_and_the_search_goes_on(tiny_data, tmp_path, monkeypatch,
                                                            capsys):
  from experiments import steps
  monkeypatch.setattr(tuning, 'draw_num_runs', lambda *a, **k: 2)
  real_train = train.train_and_evaluate

  def first_diverges(config):
    if config.workdir.endswith('run_000'):
      raise steps.TrainingDiverged('training diverged: non-finite training loss at step 3')
    return real_train(config)

  monkeypatch.setattr(train, 'train_and_evaluate', first_diverges)
  workdir = tmp_path / 'tune'
  assert tune.main(_argv(tiny_data, workdir)) == 0
  not_covered = json.loads((workdir / tune.NOT_COVERED_FILE).read_text())
  assert not_covered['diverged_runs'] == [0] and not_covered['selected_run'] == 1
  assert 'diverged' in capsys.readouterr().out


@pytest.mark.parametrize('extra,message', [
    (['--search=epsilon=1,2'], 'cannot vary'),
    (['--search=no_such_field=1'], 'unknown config field'),
    (['--distribution=poisson', '--mu=3'], 'takes --mu, not --gamma'),
    (['--eta=-2'], 'eta'),
    (['--set', 'noise_multiplier=3'], 'calibrated by the tuner'),
    (['--set', 'selection=last'], 'validation metric'),
    (['--search=selection=val_auc,val_balanced_accuracy'], 'scores of different metrics'),
    (['--set', 'num_processes=2'], 'one process draws K'),
    (["--search=sampling=poisson,shuffled"], 'neighbouring relations'),
])
def test_bad_input_is_one_line_and_exit_2(tiny_data, tmp_path, capsys, extra, message):
  argv = _argv(tiny_data, tmp_path / 'bad', *extra)
  assert tune.main(argv) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and message in err
  assert not (tmp_path / 'bad').exists()


def test_a_resumed_search_with_other_flags_is_refused(tiny_data, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(tuning, 'draw_num_runs', lambda *a, **k: 1)
  monkeypatch.setattr(train, 'train_and_evaluate', lambda config: (_ for _ in ()).throw(
      KeyboardInterrupt()))
  with pytest.raises(KeyboardInterrupt):
    tune.main(_argv(tiny_data, tmp_path / 'w'))
  capsys.readouterr()
  argv = _argv(tiny_data, tmp_path / 'w')
  argv[2] = '--epsilon=4'
  assert tune.main(argv) == 2
  assert 'other flags' in capsys.readouterr().err


def test_a_search_whose_runs_selected_by_another_rule_names_its_own_workdir(
    tiny_data, tmp_path, monkeypatch, capsys):
  # E.g. a search made when --selection=auto meant validation ROC AUC, resumed after it came to
  # mean balanced accuracy: its finished runs are not this search's, and the one line names
  # the flag the user sets (the search's --workdir), not a run folder inside it.
  monkeypatch.setattr(tuning, 'draw_num_runs', lambda *a, **k: 1)
  workdir = tmp_path / 'tune'
  assert tune.main(_argv(tiny_data, workdir)) == 0
  results_path = workdir / 'runs' / 'run_000' / 'results.json'
  results = json.loads(results_path.read_text())
  assert results['release']['selection_rule'] == 'val_balanced_accuracy'
  results['release']['selection_rule'] = 'val_auc'
  results_path.write_text(json.dumps(results))
  capsys.readouterr()
  assert tune.main(_argv(tiny_data, workdir)) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1
  assert err.startswith(f'error: --workdir={workdir}: its run 1 selected its model by val_auc')
  assert 'this search by val_balanced_accuracy; use a new --workdir' in err
  assert 'run_000' not in err
