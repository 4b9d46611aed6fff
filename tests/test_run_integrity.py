"""Runs that never lie and never lose work: presets that apply, data that cannot change under a
run, one-line refusals; and the probe script that replays a demanding user's list."""

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpjax.data import datasets
from experiments import grid
from experiments import probes
from experiments import run
from experiments import train

REPO = Path(__file__).resolve().parents[1]
TINY = ['--epochs=1', '--image_size=32', '--batch_size=8', '--eval_batch_size=16',
        '--arch=tiny', '--progress=false', '--weights=none']


def _grid_cell(protocol: str, data_dir: str, mech: str, beta: float):
  args = grid.build_parser().parse_args([f'--protocol={protocol}', f'--data_dir={data_dir}'])
  (config,) = [c for c in grid.cell_configs(args) if c.mech == mech and c.beta == beta]
  return config


@pytest.mark.parametrize('protocol', ['sound', 'paper'])
@pytest.mark.parametrize('data_dir', ['', '/data/chest_xray'])
def test_a_single_run_gets_the_grid_cells_settings(protocol, data_dir):
  # `--protocol=paper` used to change only the label of a single run.
  flags = [f'--protocol={protocol}', '--mech=dpsgd', '--beta=2'] + (
      [f'--data_dir={data_dir}'] if data_dir else [])
  single = run.make_config(flags).to_dict()
  cell = _grid_cell(protocol, data_dir, 'dpsgd', 2.0).to_dict()
  single.pop('workdir'), cell.pop('workdir')
  assert single == cell
  if protocol == 'paper':
    assert (single['norm'], single['sampling'], single['clip_group_size'], single['delta'],
            single['ldp_variant'], single['privacy_unit']) == (
                'batch_norm', 'shuffled', 4, 1e-4, 'paper_brightness', 'image')
  # Explicit flags still win over the preset.
  assert run.make_config(flags + ['--delta=1e-6', '--norm=group_norm']).delta == 1e-6
  assert run.make_config(flags + ['--norm=group_norm']).norm == 'group_norm'


def test_results_record_the_settings_actually_used(tiny_data, tmp_path, capsys):
  workdir = tmp_path / 'paper'
  code = run.main(['--protocol=paper', '--mech=ldp', f'--data_dir={tiny_data["pneumonia"]}',
                   f'--workdir={workdir}', *TINY])
  assert code == 0, capsys.readouterr().err
  results = json.loads((workdir / 'results.json').read_text())
  assert results['config']['ldp_variant'] == 'paper_brightness'
  assert results['ldp']['variant'] == 'paper_brightness' and results['epsilon'] == 'inf'


def test_changed_data_is_refused_for_a_finished_run(tiny_data, tmp_path, capsys):
  import shutil
  data = tmp_path / 'data'
  shutil.copytree(tiny_data['pneumonia'], data, copy_function=shutil.copy2)
  workdir = tmp_path / 'run'
  argv = ['--mech=none', f'--data_dir={data}', f'--workdir={workdir}', *TINY]
  assert run.main(argv) == 0
  before = (workdir / 'results.json').read_text()
  assert run.main(argv) == 0  # Same data: reused, and it says so.
  assert 'reused the finished run' in capsys.readouterr().out
  digests = [datasets.scan_dataset('pneumonia', data).content_fingerprint()]
  normal = sorted((data / 'chest_xray' / 'train' / 'NORMAL').glob('*.jpeg'))
  normal[0].rename(data / 'chest_xray' / 'train' / 'PNEUMONIA' / normal[0].name)
  assert run.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'other data' in err and str(workdir) in err
  assert 'differ from what this workdir was made with' in err
  assert (workdir / 'results.json').read_text() == before  # Nothing rewritten.
  # No digest of the data in the message: an unkeyed one (recomputable from candidate data)
  # is a membership test; the keyed ones (the workdir's salt) are not shown either.
  salt = (workdir / train.RUN_SALT_FILE).read_bytes()
  scan = datasets.scan_dataset('pneumonia', data)
  digests += [scan.content_fingerprint(), scan.content_fingerprint(salt),
              json.loads(before)['data_fingerprint']]
  for digest in digests:
    assert digest[:8] not in err
  assert json.loads(before)['data_fingerprint'] not in digests[:2]  # Recorded keyed.


def test_the_curators_files_are_private_the_release_is_not(tiny_data, tmp_path):
  # results.json holds not_covered: readable by the curator alone; release/ is for publishing.
  workdir = tmp_path / 'run'
  assert run.main(['--mech=none', f'--data_dir={tiny_data["pneumonia"]}', f'--workdir={workdir}',
                   *TINY]) == 0
  assert (workdir / 'results.json').stat().st_mode & 0o777 == 0o600
  assert (workdir / train.RUN_SALT_FILE).stat().st_mode & 0o777 == 0o600
  umask = os.umask(0)
  os.umask(umask)
  for path in (workdir / 'release').iterdir():
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path  # Ordinary files.


def test_data_errors_name_the_skip_flag(tmp_path, capsys):
  data = tmp_path / 'aptos'
  (data / 'train_images').mkdir(parents=True)
  (data / 'train.csv').write_text('id_code,diagnosis\nabc,2\n')  # Its image is missing.
  assert run.main(['--dataset=aptos', f'--data_dir={data}', f'--workdir={tmp_path / "w"}',
                   *TINY]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.endswith('(pass --skip_bad=true to skip such files)')


def test_probe_script_replays_the_list():
  proc = subprocess.run([sys.executable, '-m', 'experiments.probes'], cwd=REPO,
                        capture_output=True, text=True, timeout=1500)
  lines = proc.stdout.strip().splitlines()
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
  assert lines[-1] == 'all probes passed'
  probes = lines[:-1]
  assert len(probes) >= 20 and all(line.startswith('ok ') for line in probes), proc.stdout


def _copy(data_dir, to):
  import shutil
  shutil.copytree(data_dir, to, copy_function=shutil.copy2)
  return to


def test_data_rewritten_byte_for_byte_is_the_same_data(tiny_data, tmp_path, capsys):
  # Deleting the demo cache regenerates byte-identical files with new times: once refused.
  data = _copy(tiny_data['pneumonia'], tmp_path / 'data')
  workdir = tmp_path / 'run'
  argv = ['--mech=none', f'--data_dir={data}', f'--workdir={workdir}', *TINY]
  assert run.main(argv) == 0
  files = sorted(p for p in data.rglob('*.jpeg'))
  for path in files:
    path.write_bytes(path.read_bytes())
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
  capsys.readouterr()
  assert run.main(argv) == 0, capsys.readouterr().err
  assert 'reused the finished run' in capsys.readouterr().out
  # Same size and time, other bytes: still other data (the listing only spares reading).
  raw = bytearray(files[0].read_bytes())
  raw[-3] ^= 0xFF
  files[0].write_bytes(bytes(raw))
  os.utime(files[0], ns=(1_000_000_000, 1_000_000_000))
  listing = json.loads((workdir / 'data_listing.json').read_text())
  assert (workdir / 'data_listing.json').stat().st_mode & 0o777 == 0o600
  rel = files[0].relative_to(datasets.scan_dataset('pneumonia', data).root).as_posix()
  listing[rel][1] += 1  # A recorded time that no longer matches: the file is read again.
  (workdir / 'data_listing.json').write_text(json.dumps(listing))
  assert run.main(argv) == 2
  assert 'other data' in capsys.readouterr().err


def test_flags_that_change_no_result_reuse_the_finished_run(tiny_data, tmp_path, capsys):
  workdir = tmp_path / 'run'
  argv = ['--mech=none', f'--data_dir={tiny_data["pneumonia"]}', f'--workdir={workdir}', *TINY]
  assert run.main(argv) == 0
  before = (workdir / 'results.json').read_text()
  capsys.readouterr()
  assert run.main([*argv, '--eval_batch_size=8', '--checkpoint_every_steps=3',
                   '--heartbeat_timeout_s=30', '--microbatch_size=4']) == 0
  out, err = capsys.readouterr()
  assert 'reused the finished run' in out
  assert '--eval_batch_size: 16 -> 8' in err and 'float rounding' in err, err
  assert (workdir / 'results.json').read_text() == before
  assert run.main([*argv, '--momentum=0.5']) == 2  # One that does change it: still refused.


def _kill_at_results_json(monkeypatch):
  """A kill (Ctrl-C) just as the run would write results.json: training done, checkpoints kept."""
  from experiments import provenance
  real_write = provenance.write_json_atomic

  def killed_at_results(path, obj, mode=None):
    if path.name == 'results.json':
      raise KeyboardInterrupt
    real_write(path, obj, mode)

  monkeypatch.setattr(provenance, 'write_json_atomic', killed_at_results)


@pytest.mark.parametrize('killed', [False, True])
def test_a_run_made_when_auto_meant_another_rule_is_neither_reused_nor_resumed(
    tiny_data, tmp_path, monkeypatch, capsys, killed):
  # --selection=auto resolves by version (it was val_auc for two classes): the release of a
  # run that selected otherwise is not what this configuration means.
  from experiments import selection
  workdir = tmp_path / 'run'
  argv = ['--mech=none', f'--data_dir={tiny_data["pneumonia"]}', f'--workdir={workdir}', *TINY]
  monkeypatch.setattr(selection, 'resolve', lambda *a, **k: 'val_auc')
  if killed:
    _kill_at_results_json(monkeypatch)
  assert run.main(argv) == (130 if killed else 0)
  monkeypatch.undo()
  capsys.readouterr()
  assert run.main(argv) == 2
  err = capsys.readouterr().err.strip()
  what = 'checkpointed' if killed else 'finished'
  assert err == (f'error: --workdir={workdir}: its {what} run selected its model by val_auc (what '
                 'its --selection meant then), this run by val_balanced_accuracy; use a new '
                 '--workdir'), err


@pytest.mark.parametrize('killed', [False, True])
def test_a_run_whose_rule_scored_otherwise_then_is_neither_reused_nor_resumed(
    tiny_data, tmp_path, monkeypatch, capsys, killed):
  # Same rule name, other scoring (an older version's, e.g. before its tie-break or rounding):
  # the model it kept, in results.json and in every checkpoint, is not the one this version
  # selects from the same history (here: an epoch none kept).
  from experiments import selection
  workdir = tmp_path / 'run'
  argv = ['--mech=none', f'--data_dir={tiny_data["pneumonia"]}', f'--workdir={workdir}', *TINY,
          '--epochs=3']
  if killed:
    _kill_at_results_json(monkeypatch)
  assert run.main(argv) == (130 if killed else 0)
  monkeypatch.undo()
  monkeypatch.setattr(selection, 'replay', lambda history, rule: (4, (1.0, 1.0)))
  capsys.readouterr()
  assert run.main(argv) == 2
  err = capsys.readouterr().err.strip()
  what = 'checkpointed' if killed else 'finished'
  assert re.fullmatch(
      rf'error: --workdir={re.escape(str(workdir))}: its {what} run kept the model of epoch '
      r'[123], where val_balanced_accuracy as this version computes it selects epoch 4; '
      r'use a new --workdir', err), err


def test_a_resume_skips_a_checkpoint_this_version_would_not_have_made(tiny_data, tmp_path,
                                                                    monkeypatch, capsys):
  # An older version scored the last epoch otherwise: its newest checkpoint kept another
  # epoch's model, the one before it agrees with this version. The run resumes from that one
  # (its noise re-derived from the same secret key) and ends as this version would.
  from experiments import selection
  workdir = tmp_path / 'run'
  argv = ['--mech=none', f'--data_dir={tiny_data["pneumonia"]}', f'--workdir={workdir}', *TINY,
          '--epochs=3']
  real_is_better = selection.is_better
  calls = []

  def older_at_epoch_3(new, best, epoch, rule):
    calls.append(1)
    verdict = real_is_better(new, best, epoch, rule)
    return (not verdict) if len(calls) == 3 else verdict

  monkeypatch.setattr(selection, 'is_better', older_at_epoch_3)
  _kill_at_results_json(monkeypatch)
  assert run.main(argv) == 130
  monkeypatch.setattr(selection, 'is_better', real_is_better)
  capsys.readouterr()
  assert run.main(argv) == 130  # Resumed, and killed again at the end.
  err = capsys.readouterr().err
  skipped = re.search(rf'warning: --workdir={re.escape(str(workdir))}: its checkpoint of step '
                      r'(\d+) kept the model of epoch [123], where val_balanced_accuracy as this '
                      r'version computes it selects epoch [123]; removed it\n', err)
  assert skipped, err
  resumed = int(re.search(r'resumed from step (\d+)', err).group(1))
  assert resumed < int(skipped.group(1))
  # Removed, it neither shadowed the resumed run's saves nor is met again.
  monkeypatch.undo()
  assert run.main(argv) == 0
  err = capsys.readouterr().err
  assert 'warning' not in err and 'resumed from step' in err, err
  results = json.loads((workdir / 'results.json').read_text())
  history = results['release']['history']
  assert [record['epoch'] for record in history] == [1, 2, 3]
  assert results['release']['best_epoch'] == selection.replay(history, 'val_balanced_accuracy')[0]


def _edit_metadata(step_dir: Path, item: str, edit) -> None:
  """Applies `edit` to a checkpoint's JSON item ('meta' or 'secret'), its digest unchanged."""
  path = step_dir / item / 'metadata'
  content = json.loads(path.read_text())
  edit(content)
  path.write_text(json.dumps(content))


def _alter_history(step_dir: Path) -> None:
  # Parseable, plausible, and not what was measured: caught by the metadata digest.
  _edit_metadata(step_dir, 'meta', lambda meta: meta['epochs'][-1].update(val_accuracy=0.123))


def _killed_run_with_two_checkpoints(tiny_data, workdir, monkeypatch) -> tuple[list, list[Path]]:
  """(argv, [older, newer] checkpoint folders) of a DP-SGD run killed as it finished."""
  argv = ['--mech=dpsgd', f'--data_dir={tiny_data["pneumonia"]}', f'--workdir={workdir}', *TINY,
          '--epochs=3']
  with monkeypatch.context() as patch:
    _kill_at_results_json(patch)
    assert run.main(argv) == 130
  folders = sorted((p for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()),
                   key=lambda p: int(p.name))
  assert len(folders) == 2
  return argv, folders


@pytest.mark.parametrize('damage', [probes.garble_meta, probes.truncate_state, _alter_history])
def test_a_damaged_checkpoint_is_removed_so_the_resumed_run_saves_again(tiny_data, tmp_path,
                                                                        monkeypatch, capsys,
                                                                        damage):
  # Left in place, the damaged newest checkpoint would silence every save up to its step (orbax
  # never saves behind its newest) and greet every later resume again.
  workdir = tmp_path / 'run'
  argv, (_, newer) = _killed_run_with_two_checkpoints(tiny_data, workdir, monkeypatch)
  newest = int(newer.name)
  damage(newer)
  capsys.readouterr()
  with monkeypatch.context() as patch:
    _kill_at_results_json(patch)
    assert run.main(argv) == 130  # Resumed from the older one, and killed again at the end.
  err = capsys.readouterr().err
  assert re.search(rf'warning: --workdir={re.escape(str(workdir))}: its checkpoint of step '
                   rf'{newest} is damaged \([^)]*\); removed it\n',
                   err), err
  assert int(re.search(r'resumed from step (\d+)', err).group(1)) < newest
  # The step it held was saved again: the next resume starts there, with no warning.
  assert run.main(argv) == 0
  err = capsys.readouterr().err
  assert 'warning' not in err and f'resumed from step {newest} ' in err, err
  results = json.loads((workdir / 'results.json').read_text())
  assert results['steps'] == sum(run_[2] for run_ in results['privacy_ledger']['runs'])
  assert 0.123 not in [record['val_accuracy'] for record in results['release']['history']]


def test_no_checkpoint_is_removed_when_none_can_be_resumed(tiny_data, tmp_path, monkeypatch,
                                                            capsys):
  workdir = tmp_path / 'run'
  argv, (older, newer) = _killed_run_with_two_checkpoints(tiny_data, workdir, monkeypatch)
  probes.garble_meta(newer)  # Skipped on reading its metadata ...
  probes.truncate_state(older)  # ... and the only other one fails on its arrays.
  capsys.readouterr()
  assert run.main(argv) == 2
  err = capsys.readouterr().err
  assert err.strip().splitlines() == [
      f'error: no intact checkpoint in {workdir / "checkpoints"} (2 damaged): delete that folder '
      'to start the run over (with fresh noise: anything already published from the lost run, '
      'such as a validation accuracy, composes with the new run)'], err
  assert older.is_dir() and newer.is_dir()


def test_a_checkpoint_whose_secret_key_disagrees_with_its_state_is_refused(tiny_data, tmp_path,
                                                                           monkeypatch, capsys):
  # Its secret item (what the batches are drawn with) is not the key its state was built with:
  # resumed, the same noise would fall on other batches.
  workdir = tmp_path / 'run'
  argv, (_, newer) = _killed_run_with_two_checkpoints(tiny_data, workdir, monkeypatch)
  _edit_metadata(newer, 'secret', lambda secret: secret['private_key'].__setitem__(
      0, secret['private_key'][0] ^ 1))
  _redigest(newer)
  capsys.readouterr()
  assert run.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f'error: the checkpoints in {workdir / "checkpoints"} disagree on the run\'s '
                 'secret key: delete that folder to start the run over (with fresh noise)'], err
  assert not (workdir / 'results.json').exists()


def _redigest(step_dir: Path) -> None:
  """Writes the metadata digest of what the checkpoint now holds: an inconsistent checkpoint
  as a faulty writer would leave it, which only the checks against its state can catch."""
  from experiments import checkpoint
  secret = json.loads((step_dir / 'secret' / 'metadata').read_text())
  _edit_metadata(step_dir, 'meta', lambda meta: meta.update(
      metadata_digest=checkpoint.metadata_digest(meta, secret)))


def _fewer_steps(meta):
  meta['ledger']['runs'][0][2] -= 1  # One step fewer charged than the state has taken.


def _other_accounting(meta):
  # Counted as shuffled epochs of 1,000 steps: far less than the Poisson steps taken.
  meta['ledger'].update(sampling='shuffled', steps_per_epoch=1000)


@pytest.mark.parametrize('edit', [_fewer_steps, _other_accounting])
def test_a_checkpoint_whose_ledger_disagrees_with_its_state_is_refused(tiny_data, tmp_path,
                                                                       monkeypatch, capsys, edit):
  workdir = tmp_path / 'run'
  argv, (_, newer) = _killed_run_with_two_checkpoints(tiny_data, workdir, monkeypatch)
  _edit_metadata(newer, 'meta', edit)
  _redigest(newer)
  capsys.readouterr()
  assert run.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f'error: the checkpoint in {workdir / "checkpoints"} '
                                             'recorded other releases than this run plans'), err


def test_a_tampered_release_is_never_reused(tiny_data, tmp_path, capsys):
  workdir = tmp_path / 'run'
  argv = ['--mech=none', f'--data_dir={tiny_data["pneumonia"]}', f'--workdir={workdir}', *TINY]
  assert run.main(argv) == 0
  model = workdir / 'release' / 'model.msgpack'
  model.write_bytes(model.read_bytes()[:100])  # Truncated.
  capsys.readouterr()
  assert run.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'model.msgpack changed' in err and str(workdir) in err
  (workdir / 'release' / 'release.json').unlink()
  assert run.main(argv) == 2
  assert 'release.json missing' in capsys.readouterr().err


def test_a_kill_before_results_json_keeps_the_checkpoints_and_finishes(tiny_data, tmp_path,
                                                                      monkeypatch, capsys):
  # release/ is written first; results.json (with release/'s digest) marks the run finished;
  # only then do the checkpoints go. Killed in between: resumed and finished, nothing lost.
  workdir = tmp_path / 'run'
  argv = ['--mech=none', f'--data_dir={tiny_data["pneumonia"]}', f'--workdir={workdir}', *TINY]
  _kill_at_results_json(monkeypatch)
  assert run.main(argv) == 130
  assert (workdir / 'release' / 'model.msgpack').exists() and not (workdir / 'results.json').exists()
  assert list((workdir / 'checkpoints').iterdir())  # The only other copy of the model: kept.
  monkeypatch.undo()
  capsys.readouterr()
  assert run.main(argv) == 0
  assert 'resumed from step' in capsys.readouterr().err
  assert (workdir / 'results.json').exists() and not (workdir / 'checkpoints').exists()


@pytest.mark.parametrize('where', ['tfds', 'checkpoint'])
def test_a_full_disk_is_one_line_and_resumable(tiny_data, tmp_path, monkeypatch, capsys, where):
  import errno
  from experiments import checkpoint
  workdir = tmp_path / 'run'
  cache = tmp_path / 'cache'
  argv = ['--mech=none', f'--data_dir={tiny_data["pneumonia"]}', f'--workdir={workdir}',
          f'--cache_dir={cache}', *TINY]
  if where == 'tfds':
    def full(*args, **kwargs):
      raise RuntimeError('Failed to write shard: No space left on device')
    monkeypatch.setattr(datasets, 'load_dataset', full)
    folder = cache
  else:
    def full(self, *args, **kwargs):
      raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(checkpoint.ocp.CheckpointManager, 'save', full)
    folder = workdir.resolve() / 'checkpoints'
  assert run.main(argv) == checkpoint.EXIT_DISK_FULL == 4
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
  assert f'no space left on the device of {folder}' in err and 'run the same command again' in err
  monkeypatch.undo()
  assert run.main(argv) == 0


def test_run_lengths_whose_memory_grows_are_refused_up_front(tiny_data, tmp_path, capsys):
  # --epochs=1000000 grew to 22.7 GB and was killed by the kernel without a word.
  workdir = tmp_path / 'run'
  for mech in ('--mech=none', '--mech=ldp', '--mech=dpsgd'):
    assert run.main([mech, '--accountant=rdp', '--epochs=1000000',
                     f'--data_dir={tiny_data["pneumonia"]}', f'--workdir={workdir}', *TINY[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and '--epochs=1000000: at most' in err, err
  # Checkpoints every step over a long run: each save keeps memory with orbax.
  assert run.main(['--mech=none', '--epochs=5000', '--checkpoint_every_steps=1',
                   f'--data_dir={tiny_data["pneumonia"]}', f'--workdir={workdir}', *TINY[1:]]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and '--checkpoint_every_steps=1' in err, err
  assert not workdir.exists()


def test_trainable_batchnorm_voids_every_epsilon(tiny_data, tmp_path, capsys):
  # The paper protocol trains BatchNorm under DP-SGD: no guarantee, so no finite epsilon may be
  # published anywhere in the summary (epsilon_pld and epsilon_rdp once stayed finite).
  workdir = tmp_path / 'paper_dpsgd'
  code = run.main(['--protocol=paper', '--mech=dpsgd', f'--data_dir={tiny_data["pneumonia"]}',
                   f'--workdir={workdir}', '--microbatch_size=8', *TINY])
  assert code == 0, capsys.readouterr().err
  results = json.loads((workdir / 'results.json').read_text())
  assert results['config']['norm'] == 'batch_norm'
  for field in ('epsilon', 'epsilon_pld', 'epsilon_rdp', 'epsilon_replace_one'):
    assert results[field] == 'inf', (field, results[field])
  assert results['guarantee'].startswith('NO DP guarantee')


def test_a_checkpoint_that_cannot_be_removed_stops_the_run_in_one_line(tmp_path, monkeypatch):
  # Left in place it would silence every save up to its step: never "removed" when it is not.
  import shutil

  from experiments.config_checks import ConfigError
  (tmp_path / 'checkpoints' / '15').mkdir(parents=True)

  def refused(path):
    raise PermissionError(13, 'Permission denied', str(path))

  monkeypatch.setattr(shutil, 'rmtree', refused)
  with pytest.raises(ConfigError, match=rf'^--workdir={re.escape(str(tmp_path))}: cannot remove '
                     r'its checkpoint of step 15, which the resume skips '
                     r'\(.*Permission denied.*\); remove it or use a new --workdir$'):
    train._remove_skipped_checkpoints(tmp_path, None, [train._Skipped(15, 'kept the model of '
                                                                        'epoch 3', False)])
  assert (tmp_path / 'checkpoints' / '15').is_dir()
