"""gs:// data, workdir and cache (experiments.remote_paths), on a bucket mocked by a local folder.

No cloud is reachable here: `etils.epath.testing.mock_epath` maps every `gs://bucket/...` that
epath opens onto `<tmp>/gcs/bucket/...`, and its walk yields scheme-less roots, as gcsfs does.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from etils.epath.testing import mock_epath

from experiments import remote_paths
from experiments.config_checks import ConfigError
from experiments.configs import default as default_config

REPO = Path(__file__).resolve().parents[1]
_DOWNLOAD = remote_paths._download


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """The folder behind gs:// while the test runs; local copies go to <tmp>/staging."""
  root = tmp_path / 'gcs'
  root.mkdir()
  monkeypatch.setenv(remote_paths.STAGING_ENV, str(tmp_path / 'staging'))
  monkeypatch.setenv(remote_paths.SYNC_EVERY_ENV, '0')  # Pushes at the end (and on errors).

  def local(path):
    text = os.fspath(path)
    return str(root / text[len('gs://'):]) if text.startswith('gs://') else text

  def one(fn, path, *args, **kwargs):
    return fn(local(path), *args, **kwargs)

  def two(fn, path, dst, *args, **kwargs):
    return fn(local(path), local(dst), *args, **kwargs)

  def open_(fn, path, mode):
    if 'r' not in mode:  # A bucket needs no folders.
      Path(local(path)).parent.mkdir(parents=True, exist_ok=True)
    return fn(local(path), mode)

  def walk(fn, top, **kwargs):
    for folder, dirs, files in fn(local(top), **kwargs):
      if os.fspath(top).startswith('gs://'):
        folder = os.path.relpath(folder, root)  # 'bucket/...', like gcsfs.
      yield folder, dirs, files

  with mock_epath(open=open_, exists=one, isdir=one, listdir=one, walk=walk, makedirs=one,
                  mkdir=one, remove=one, rmtree=one, stat=one, rename=two, replace=two, copy=two):
    yield root


def _files(folder: Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*'))
          if p.is_file()}


def _count_downloads(monkeypatch, fail_after: int | None = None) -> list[str]:
  done = []

  def download(src, dst, *args, **kwargs):
    if fail_after is not None and len(done) >= fail_after:
      raise KeyboardInterrupt  # A copy stopped half-way.
    _DOWNLOAD(src, dst, *args, **kwargs)
    done.append(str(dst))

  monkeypatch.setattr(remote_paths, '_download', download)
  return done


def _data_config(url: str):
  config = default_config.get_config()
  config.data_dir = url
  return config


def test_data_are_copied_once_completed_after_an_interruption_and_kept_current(
    bucket, tiny_data, tmp_path, monkeypatch):
  shutil.copytree(tiny_data['pneumonia'], bucket / 'b' / 'data')
  want = _files(bucket / 'b' / 'data')
  total = len(want)

  downloads = _count_downloads(monkeypatch, fail_after=5)
  with pytest.raises(KeyboardInterrupt):
    with remote_paths.staged(_data_config('gs://b/data')):
      pass
  local = tmp_path / 'staging' / 'remote' / 'data' / 'gs' / 'b' / 'data'
  marker = local.with_name(local.name + remote_paths.MARKER_SUFFIX)
  assert not marker.exists()  # Never used half-made.
  copied = len(_files(local))
  assert 5 <= copied < total

  downloads = _count_downloads(monkeypatch)
  with remote_paths.staged(_data_config('gs://b/data')) as config:
    assert config.data_dir == str(local)
    assert _files(local) == want
  assert len(downloads) == total - copied and marker.exists()  # It went on where it stopped.
  assert remote_paths.original_path(str(local)) == 'gs://b/data'

  downloads = _count_downloads(monkeypatch)
  with remote_paths.staged(_data_config('gs://b/data')) as config:
    assert config.data_dir == str(local)
  assert downloads == []  # Copied once.

  # The bucket changes: one file more, one less. The copy follows, changed files only.
  first = sorted(want)[0]
  (bucket / 'b' / 'data' / first).unlink()
  (bucket / 'b' / 'data' / 'extra.txt').write_text('new')
  with remote_paths.staged(_data_config('gs://b/data')):
    pass
  assert downloads == [str(local / 'extra.txt')]
  assert _files(local) == _files(bucket / 'b' / 'data')


def test_a_missing_or_unsupported_remote_is_one_line(bucket):
  with pytest.raises(ConfigError, match=r'--data_dir=gs://b/nothing: no such file or folder'):
    with remote_paths.staged(_data_config('gs://b/nothing')):
      pass
  with pytest.raises(ConfigError, match=r'unsupported URL scheme ftp://'):
    from experiments import config_checks
    config_checks.validate_config(_data_config('ftp://host/data'))
  (bucket / 'b').mkdir()
  (bucket / 'b' / 'file').write_text('x')
  config = default_config.get_config()
  config.workdir = 'gs://b/file'
  with pytest.raises(ConfigError, match=r'--workdir=gs://b/file is a file'):
    with remote_paths.staged(config):
      pass
  # Several processes write one checkpoint into one folder: per-machine copies cannot be it.
  config.update(workdir='gs://b/run', coordinator_address='127.0.0.1:1234', num_processes=2)
  with pytest.raises(ConfigError, match=r'--workdir=gs://b/run: a job of several processes'):
    with remote_paths.staged(config):
      pass
  assert not (bucket / 'b' / 'run').exists()


def test_a_url_that_reaches_train_unstaged_is_refused(tmp_path):
  from experiments.workdir import check_writable_dir
  with pytest.raises(ConfigError, match=r'--workdir=gs://b/run: a bucket is not a local folder'):
    check_writable_dir(Path('gs://b/run'), '--workdir')
  assert not Path('gs:').exists()


def test_push_and_pull_move_finished_files_and_follow_deletions(bucket, tmp_path):
  local = tmp_path / 'copy'
  folder = remote_paths.SyncedFolder('gs://b/run', '--workdir', local, 'workdir', mirror=True)
  folder.pull()
  (local / 'checkpoints' / '2').mkdir(parents=True)
  (local / 'checkpoints' / '2' / 'item').write_text('two')
  (local / 'checkpoints' / '4.orbax-checkpoint-tmp-123').mkdir()
  (local / 'checkpoints' / '4.orbax-checkpoint-tmp-123' / 'item').write_text('half')
  (local / 'grid.lock').write_text('pid')
  (local / '.results.json.abc.tmp').write_text('{')
  (local / 'secret_salt').write_bytes(b's' * 32)
  assert folder.push() == 2
  assert _files(bucket / 'b' / 'run') == {'checkpoints/2/item': b'two', 'secret_salt': b's' * 32}

  shutil.rmtree(local / 'checkpoints')  # The run finished: its checkpoints go, remotely too.
  (local / 'results.json').write_text('{}')
  assert folder.push() == 1
  assert _files(bucket / 'b' / 'run') == {'results.json': b'{}', 'secret_salt': b's' * 32}
  assert not (bucket / 'b' / 'run' / 'checkpoints').exists()

  # Another machine's copy: the bucket's files, then its own changes go back.
  other = remote_paths.SyncedFolder('gs://b/run', '--workdir', tmp_path / 'other', 'workdir',
                                    mirror=True)
  assert other.pull() == 2
  (tmp_path / 'other' / 'results.json').write_text('{"new": 1}')
  (tmp_path / 'other' / 'secret_salt').unlink()
  other.push()
  # Back on the first: the remote change comes in, the remote deletion is followed, and a
  # file only this copy has (never exchanged) is kept.
  (local / 'mine').write_text('local only')
  folder.pull()
  assert _files(local) == {'results.json': b'{"new": 1}', 'mine': b'local only',
                           'grid.lock': b'pid', '.results.json.abc.tmp': b'{'}
  shutil.rmtree(bucket / 'b' / 'run')  # Gone remotely: the copy is not wiped on that alone.
  with pytest.raises(ConfigError, match=r'--workdir=gs://b/run no longer exists, but its local copy'):
    folder.pull()
  assert (local / 'results.json').exists()


def _run_preempted_after_two_saves(bucket, tiny_data, monkeypatch) -> list[str]:
  """A DP-SGD run on gs://b/data into gs://b/run, "preempted" (Ctrl-C) right after its second
  checkpoint save; returns its flags for the resumption."""
  from experiments import checkpoint
  from experiments import run
  shutil.copytree(tiny_data['pneumonia'], bucket / 'b' / 'data')
  args = ['--data_dir=gs://b/data', '--workdir=gs://b/run', '--mech=dpsgd', '--beta=1',
          '--epochs=1', '--image_size=32', '--batch_size=8', '--microbatch_size=8',
          '--eval_batch_size=16', '--arch=tiny', '--weights=none', '--progress=false',
          '--checkpoint_every_steps=1', '--augment=false', '--noise_seed=1']
  real_save, saves = checkpoint.RunCheckpointer.save, []

  def save_then_die(self, step, *rest):
    real_save(self, step, *rest)
    saves.append(step)
    if len(saves) == 2:
      raise KeyboardInterrupt  # Preempted.

  monkeypatch.setattr(checkpoint.RunCheckpointer, 'save', save_then_die)
  assert run.main(args) == 130
  monkeypatch.setattr(checkpoint.RunCheckpointer, 'save', real_save)
  return args


def test_a_run_on_the_bucket_resumes_and_is_reused_on_fresh_machines(
    bucket, tiny_data, tmp_path, monkeypatch, capsys):
  """Killed on one VM, resumed on another from what the bucket holds, reused on a third."""
  from experiments import run
  args = _run_preempted_after_two_saves(bucket, tiny_data, monkeypatch)
  remote = bucket / 'b' / 'run'
  assert (remote / 'secret_salt').exists() and not (remote / 'results.json').exists()
  assert sorted(p.name for p in (remote / 'checkpoints').iterdir()) == ['1', '2']
  err = capsys.readouterr().err
  assert 'keep that bucket private' in err, err

  local_copies = tmp_path / 'staging' / 'remote' / 'workdir'
  shutil.rmtree(local_copies)  # Another VM: nothing of the run on its disk.
  assert run.main(args) == 0
  out, err = capsys.readouterr()
  assert 'resumed from step 2' in err, err
  assert 'copied' in err and 'gs://b/run' in err
  files = _files(remote)
  for name in ('results.json', 'release/model.msgpack', 'release/release.json',
               'release.sha256.json', 'secret_salt'):
    assert name in files, sorted(files)
  assert not any(name.startswith('checkpoints/') or 'orbax-checkpoint-tmp' in name
                 or name.endswith(('.lock', '.tmp')) for name in files), sorted(files)
  results = json.loads(files['results.json'])
  assert results['steps'] > 2 and results['epochs'] == 1
  assert remote_paths.original_path(results['config']['data_dir']) == 'gs://b/data'
  local = local_copies / 'gs' / 'b' / 'run'
  assert (local / 'results.json').read_bytes() == files['results.json']
  assert oct((local / 'results.json').stat().st_mode & 0o777) == '0o600'

  shutil.rmtree(local_copies)  # A third VM: the finished run is pulled and reused.
  assert run.main(args) == 0
  out, err = capsys.readouterr()
  assert 'reused the finished run' in out, out
  assert _files(remote) == files


def test_a_signal_runs_the_exit_hooks_before_the_prompt_exit(tmp_path):
  """SIGTERM (a preempted VM) copies the finished files first, then exits with 143."""
  flag = tmp_path / 'pushed'
  code = ('import os, signal, sys, time\n'
          'from experiments import cli\n'
          'cli.exit_promptly_on_signals()\n'
          f'cli.on_signal_exit(lambda: open({str(flag)!r}, "w").write("pushed"))\n'
          'os.kill(os.getpid(), signal.SIGTERM)\n'
          'time.sleep(60)\n')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
  assert flag.read_text() == 'pushed'


def test_a_remote_cache_only_adds_and_the_pusher_pushes_while_the_run_goes_on(bucket, tmp_path):
  (bucket / 'b' / 'cache' / 'tfds').mkdir(parents=True)
  (bucket / 'b' / 'cache' / 'tfds' / 'prepared').write_text('remote')
  (bucket / 'b' / 'cache' / 'secret_salt').write_text('remote salt')
  local = tmp_path / 'cache'
  (local / 'demo').mkdir(parents=True)
  (local / 'demo' / 'images').write_text('regenerated, never copied')
  (local / 'secret_salt').write_text('local salt')
  cache = remote_paths.SyncedFolder('gs://b/cache', '--cache_dir', local, 'cache', mirror=False)
  assert cache.pull() == 1  # Only what is missing here.
  assert (local / 'secret_salt').read_text() == 'local salt'
  (local / 'weights').mkdir()
  (local / 'weights' / 'resnet18.lock').write_text('')
  (local / 'weights' / 'resnet18').write_text('converted')
  (local / 'tfds' / 'prepared').unlink()
  assert cache.push() == 1
  assert _files(bucket / 'b' / 'cache') == {'tfds/prepared': b'remote', 'secret_salt': b'remote salt',
                                            'weights/resnet18': b'converted'}

  run = remote_paths.SyncedFolder('gs://b/run', '--workdir', tmp_path / 'run', 'workdir',
                                  mirror=True)
  run.pull()
  pusher = remote_paths._Pusher(run, 0.05, lambda: True)
  pusher.start()
  try:
    (tmp_path / 'run' / 'metrics.jsonl').write_text('{"step": 1}\n')
    for _ in range(200):
      if (bucket / 'b' / 'run' / 'metrics.jsonl').exists():
        break
      time.sleep(0.05)
  finally:
    pusher.stop()
  assert (bucket / 'b' / 'run' / 'metrics.jsonl').read_text() == '{"step": 1}\n'
  assert not remote_paths._first_process(multi_process=True)  # No job gathered: no push.


def test_a_grid_on_the_bucket_writes_its_tables_there_and_reuses_its_cells(
    bucket, tiny_data, capsys):
  from experiments import grid
  shutil.copytree(tiny_data['pneumonia'], bucket / 'b' / 'data')
  argv = ['--dataset=pneumonia', '--data_dir=gs://b/data', '--workdir=gs://b/grid',
          '--cells=original', '--set', 'cache_dir=gs://b/cache']
  for setting in ('epochs=1', 'image_size=32', 'batch_size=8', 'eval_batch_size=16', 'arch=tiny',
                  'progress=false', 'weights=none', 'microbatch_size=8'):
    argv += ['--set', setting]
  assert grid.main(argv) == 0, capsys.readouterr().err
  files = _files(bucket / 'b')
  assert 'grid/sound/table.md' in files and 'grid/sound/release/table.md' in files
  assert 'grid/sound/pneumonia/paper/original_seed0/results.json' in files
  assert any(name.startswith('cache/tfds/') for name in files)
  assert not any(name.endswith('.lock') for name in files), sorted(files)
  capsys.readouterr()
  assert grid.main(argv) == 0
  assert '(reused)' in capsys.readouterr().out


def test_a_run_resumes_on_a_machine_that_stages_elsewhere(
    bucket, tiny_data, tmp_path, monkeypatch, capsys):
  """The local copies' folder is no part of the run: another VM (another $DPJAX_STAGING,
  --cache_dir or home) resumes it, and its --noise_seed identity is the same."""
  from experiments import run
  args = _run_preempted_after_two_saves(bucket, tiny_data, monkeypatch)
  monkeypatch.setenv(remote_paths.STAGING_ENV, str(tmp_path / 'other_vm'))
  capsys.readouterr()
  code = run.main(args)
  err = capsys.readouterr().err
  assert code == 0, err
  assert 'resumed from step 2' in err, err
