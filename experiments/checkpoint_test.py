import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import checkpoint
from experiments.probes import garble_meta, largest_file, remove_state, truncate_state


def _state(seed):
  key = jax.random.key(seed)
  return {'params': {'w': jax.random.normal(key, (3, 2))}, 'step': jnp.int32(seed),
          'rng': jax.random.fold_in(key, 7), 'nested': (jnp.arange(4.0), {})}


def test_round_trip_keeps_values_keys_and_meta(tmp_path):
  ckpt = checkpoint.RunCheckpointer(tmp_path)
  assert ckpt.latest_step() is None
  state, best = _state(1), {'params': {'w': jnp.ones((3, 2))}}
  meta = {'ledger': {'runs': [[1.5, 0.01, 7]]}, 'history': [{'epoch': 1, 'val_loss': 0.3}]}
  ckpt.save(7, state, best, meta, {'private_key': [1, 2]})
  ckpt.save(9, _state(2), best, {**meta, 'step': 9}, {'private_key': [3, 4]})
  assert ckpt.latest_step() == 9
  restored_state, restored_best, restored_meta = ckpt.restore(7, _state(0), best)
  np.testing.assert_array_equal(restored_state['params']['w'], state['params']['w'])
  assert int(restored_state['step']) == 1
  # The restored key draws the same numbers as the saved one.
  np.testing.assert_array_equal(jax.random.normal(restored_state['rng'], (5,)),
                                jax.random.normal(state['rng'], (5,)))
  np.testing.assert_array_equal(restored_best['params']['w'], 1.0)
  assert restored_meta.pop('metadata_digest') == checkpoint.metadata_digest(
      {**meta, 'arrays_digest': restored_meta['arrays_digest']}, {'private_key': [1, 2]})
  assert restored_meta.pop('arrays_digest') == checkpoint.arrays_digest((state, best))
  assert restored_meta == meta
  assert ckpt.restore_secret(7) == {'private_key': [1, 2]}
  ckpt.close()
  # Private artifact: only the owner may read the checkpoints.
  assert (tmp_path / 'checkpoints').stat().st_mode & 0o077 == 0


def test_only_the_newest_checkpoints_are_kept(tmp_path):
  ckpt = checkpoint.RunCheckpointer(tmp_path, max_to_keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), {'b': jnp.zeros(1)}, {'step': step}, {})
  assert sorted(p.name for p in ckpt.directory.iterdir() if p.name.isdigit()) == ['2', '3']
  ckpt.close()


def _corrupt_state(step_dir):
  data = largest_file(step_dir / 'state')
  raw = bytearray(data.read_bytes())
  middle = len(raw) // 2
  raw[middle:middle + 16] = bytes(255 - b for b in raw[middle:middle + 16])
  data.write_bytes(bytes(raw))


@pytest.mark.parametrize('damage', [garble_meta, truncate_state, _corrupt_state, remove_state])
def test_damaged_checkpoints_are_detected_and_the_older_one_still_reads(tmp_path, damage):
  ckpt = checkpoint.RunCheckpointer(tmp_path)
  big = {'w': jnp.arange(20000.0)}  # Large enough for a data file of its own.
  ckpt.save(1, {**big, 'step': jnp.int32(1)}, big, {'step': 1}, {'private_key': [5, 6]})
  ckpt.save(2, {**big, 'step': jnp.int32(2)}, big, {'step': 2}, {'private_key': [5, 6]})
  ckpt.close()
  damage(tmp_path / 'checkpoints' / '2')
  ckpt = checkpoint.RunCheckpointer(tmp_path)
  template = {**big, 'step': jnp.int32(0)}
  with pytest.raises(checkpoint.CheckpointDamaged, match=str(tmp_path / 'checkpoints' / '2')):
    ckpt.read_json(2)
    ckpt.restore(2, template, big)
  state, _, meta = ckpt.restore(1, template, big)
  assert int(state['step']) == 1 and meta['step'] == 1
  assert ckpt.read_json(1)[1] == {'private_key': [5, 6]}
  ckpt.close()


def _small_filesystem(path):
  """A 300 KiB tmpfs at `path` (root only), or None where it cannot be mounted."""
  import subprocess
  path.mkdir()
  try:
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=300k', 'tmpfs', str(path)],
                             capture_output=True, timeout=10).returncode == 0
  except (OSError, subprocess.SubprocessError):
    mounted = False
  return path if mounted else None


def test_a_full_disk_names_the_folder_and_leaves_no_half_written_checkpoint(tmp_path,
                                                                           monkeypatch, caplog):
  import errno
  import subprocess
  small = _small_filesystem(tmp_path / 'small')
  try:
    ckpt = checkpoint.RunCheckpointer(small or tmp_path)
    ckpt.save(1, {'w': jnp.arange(100.0)}, {'w': jnp.zeros(1)}, {'step': 1}, {'k': 1})
    big = {'w': jnp.arange(200000.0)}  # 800 kB: more than the 300 KiB file system holds.
    if small is None:  # Simulated: orbax's writer fails as it does on a full device.
      real_save = ckpt._manager.save
      def full_save(step, args):
        (ckpt.directory / f'{step}.orbax-checkpoint-tmp-1').mkdir()
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "w/0": Failed to write 800000 bytes '
                         "to file 8: No space left on device [os_error_code='28']")
      monkeypatch.setattr(ckpt._manager, 'save', full_save)
    with pytest.raises(checkpoint.DiskFull, match=f'{ckpt.directory} while writing checkpoint 2'):
      ckpt.save(2, big, big, {'step': 2}, {'k': 1})
    # Nothing half-written left: only the complete checkpoint, which still reads back.
    assert sorted(p.name for p in ckpt.directory.iterdir()) == ['1']
    assert ckpt.steps() == [1]
    assert int(ckpt.restore(1, {'w': jnp.zeros(100)}, {'w': jnp.zeros(1)})[2]['step']) == 1
    assert 'No space left' not in caplog.text  # Said once, by DiskFull, not per writer thread.
    if small is None:
      monkeypatch.setattr(ckpt._manager, 'save', real_save)
    ckpt.close()
  finally:
    if small is not None:
      subprocess.run(['umount', str(small)], check=False)
  assert checkpoint.is_disk_full(OSError(errno.ENOSPC, 'No space left on device'))
  assert checkpoint.is_disk_full(RuntimeError('Failed to write: No space left on device'))
  assert not checkpoint.is_disk_full(ValueError('RESOURCE_EXHAUSTED: Out of memory allocating'))


def test_importing_changes_no_hook_and_a_checkpointer_quiets_only_closed_event_loops(tmp_path):
  # Orbax's writer threads can call into an event loop a failed save closed; those late
  # callbacks are dropped, and only once something checkpoints.
  script = f"""
import sys, threading
before = (sys.unraisablehook, threading.excepthook)
from experiments import checkpoint
assert (sys.unraisablehook, threading.excepthook) == before, 'import changed a hook'
checkpoint.RunCheckpointer({str(tmp_path)!r})
installed = (sys.unraisablehook, threading.excepthook)
assert installed[0] is not before[0] and installed[1] is not before[1]
checkpoint.RunCheckpointer({str(tmp_path)!r})
assert (sys.unraisablehook, threading.excepthook) == installed, 'wrapped twice'
class LateCallback:
  def __init__(self, message):
    self.message = message
  def __del__(self):  # An exception here goes to sys.unraisablehook.
    raise RuntimeError(self.message)
for message in ('Event loop is closed', 'another failure'):
  LateCallback(message)
"""
  done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                        timeout=120, cwd=Path(__file__).resolve().parents[1], check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'another failure' in done.stderr and 'Event loop is closed' not in done.stderr
