"""Run checkpoints with orbax: training state, best-by-validation model and the privacy ledger.

The ledger is saved in the SAME orbax checkpoint as the state it describes, and orbax
finalises a checkpoint by an atomic rename, so after a crash (even `kill -9`) the latest
checkpoint holds a state and exactly the DP steps that produced it: a resumed run neither
counts a step twice nor loses one.

Checkpoints are PRIVATE artifacts: they hold the run's secret key (the `secret` item, and the
noise key inside the optimizer state), without which an exact resume is impossible, and
statistics of training data. The folder is created readable by its owner only; publish the
model exported beside results.json, never the checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

_WRITER_WAIT_S = 3.0  # orbax's writer threads end within this once their write failed
_ITEMS = ('state', 'best', 'meta', 'secret')


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _unwrap_keys(tree):
  """Typed PRNG keys -> their raw uint32 data, which orbax stores like any array."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _rewrap_keys(template, tree):
  return jax.tree.map(
      lambda t, x: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x,
      template, tree)


EXIT_DISK_FULL = 4  # Nothing is wrong with the run: free space and run the same command again.


class DiskFull(Exception):
  """A folder ran out of space; the run resumes from its last checkpoint once space is freed."""
  exit_code = EXIT_DISK_FULL

  def __init__(self, folder: str | Path, doing: str):
    self.folder = Path(folder)
    super().__init__(f'no space left on the device of {self.folder} while {doing}; free space '
                     'there (or point the folder elsewhere) and run the same command again: '
                     'the run resumes from its last complete checkpoint')


def is_disk_full(error: BaseException) -> bool:
  """Whether `error` (or what caused it) is "no space left on device" (ENOSPC, or orbax's and
  TFDS's wrappings of it: RESOURCE_EXHAUSTED / RuntimeError naming it). An accelerator out of
  memory (also RESOURCE_EXHAUSTED) is not."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if getattr(error, 'errno', None) == errno.ENOSPC or 'No space left on device' in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


class _QuietDiskFull(logging.Filter):
  """Drops orbax's logged tracebacks of "no space left" (one per writer thread): the run says
  it in one line (DiskFull)."""

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage() + str(record.exc_info[1] if record.exc_info else '')
    return 'No space left on device' not in text


logging.getLogger('absl').addFilter(_QuietDiskFull())


def _quiet_closed_event_loop(hook):
  """`hook` (sys.unraisablehook or threading.excepthook) less orbax's writer threads' late
  callbacks into an event loop that a failed save already closed (a shutdown race after
  "no space left", harmless: the run reports DiskFull in one line)."""
  def quiet(info):
    error = info.exc_value
    if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
      return
    hook(info)
  return quiet


_quiet_hooks_installed = False


def _install_quiet_hooks() -> None:
  """Once per process, when it first checkpoints (importing this module changes nothing):
  the callbacks come late, from orbax's threads, so no narrower scope catches them."""
  global _quiet_hooks_installed  # pylint: disable=global-statement
  if not _quiet_hooks_installed:
    sys.unraisablehook = _quiet_closed_event_loop(sys.unraisablehook)
    threading.excepthook = _quiet_closed_event_loop(threading.excepthook)
    _quiet_hooks_installed = True


class disk_full_names:  # pylint: disable=invalid-name  (used as `with disk_full_names(...)`)
  """Turns "no space left" raised inside into :class:`DiskFull` naming `folder`."""

  def __init__(self, folder: str | Path, doing: str):
    self.folder, self.doing = folder, doing

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc is not None and not isinstance(exc, DiskFull) and is_disk_full(exc):
      raise DiskFull(self.folder, self.doing) from exc
    return False


class CheckpointDamaged(Exception):
  """A checkpoint that cannot be read back, or whose arrays do not match their digest."""

  def __init__(self, directory: Path, step: int, reason: str):
    super().__init__(f'checkpoint {directory / str(step)} is damaged ({reason})')
    self.step, self.reason = step, reason


def metadata_digest(meta: dict[str, Any], secret: dict[str, Any]) -> str:
  """sha256 of `meta` (less this digest) and `secret`, as JSON reads them back.

  Saved with each checkpoint and checked on reading: metadata altered yet still parseable (a
  ledger charging fewer steps, a history, the key the batches are drawn with) is caught like
  damaged arrays instead of being resumed from.
  """
  items = [{k: v for k, v in meta.items() if k != 'metadata_digest'}, secret]
  canonical = json.dumps(json.loads(json.dumps(items)), sort_keys=True)
  return hashlib.sha256(canonical.encode()).hexdigest()


def arrays_digest(tree) -> str:
  """sha256 of every array of `tree` (dtype, shape and bytes, in tree order).

  Saved with each checkpoint and checked on restore: a truncated or corrupted array file is
  caught even where the storage format would decode it without an error.
  """
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(_unwrap_keys(tree)):
    array = np.asarray(jax.device_get(leaf))
    digest.update(f'{array.dtype}{array.shape}'.encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


class RunCheckpointer:
  """Latest-state checkpoints of one run under `<workdir>/checkpoints/<step>`.

  Each checkpoint holds four items: `state` (the TrainState), `best` (the model selected on
  validation so far), `meta` (JSON: ledger, history, partial-epoch sums, selection, and the
  digest of the arrays) and `secret` (JSON: the run's private key words and their source).
  A damaged checkpoint raises :class:`CheckpointDamaged` on reading, so a caller can fall
  back to an older one (`max_to_keep` are kept).
  """

  def __init__(self, workdir: str | Path, max_to_keep: int = 2):
    _install_quiet_hooks()
    self.directory = Path(workdir).resolve() / 'checkpoints'
    self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(self.directory, 0o700)  # Private: it holds the secret key.
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

  def steps(self) -> list[int]:
    """The saved steps, newest first."""
    return sorted(self._manager.all_steps(), reverse=True)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, best, meta: dict[str, Any], secret: dict[str, Any]) -> None:
    meta = {**meta, 'arrays_digest': arrays_digest((state, best))}
    meta['metadata_digest'] = metadata_digest(meta, secret)
    threads_before = set(threading.enumerate())
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(_unwrap_keys(state)),
          best=ocp.args.StandardSave(_unwrap_keys(best)),
          meta=ocp.args.JsonSave(meta),
          secret=ocp.args.JsonSave(secret)))
      self._manager.wait_until_finished()
    except Exception as e:
      if not is_disk_full(e):
        raise
      # orbax's writer threads may still be writing after the error: let them end first, or
      # one recreates the temporary folder after it was removed.
      # (Pool threads that outlive the save use up the wait: a rare path, seconds at most.)
      deadline = time.monotonic() + _WRITER_WAIT_S
      for thread in set(threading.enumerate()) - threads_before:
        try:
          thread.join(timeout=max(0.0, deadline - time.monotonic()))
        except Exception:  # pylint: disable=broad-except  (orbax's threads re-raise their error)
          pass
      # Nothing half-written stays behind for a resume to trip over (or to hold the space).
      self.remove_unfinished(keep=set(self.steps()) - {step})
      raise DiskFull(self.directory, f'writing checkpoint {step}') from e

  def remove_unfinished(self, keep: set[int]) -> None:
    """Deletes everything in the folder but the finished checkpoints `keep` (orbax's temporary
    folders of an interrupted write, and a step folder whose write failed)."""
    for path in self.directory.iterdir():
      step = path.name.split('.')[0]
      if step.isdigit() and (path.name != step or int(step) not in keep):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    self._manager.reload()

  def read_json(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta, secret) of checkpoint `step`: what is needed before the run can be built."""
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore(), secret=ocp.args.JsonRestore()))
      meta, secret = restored['meta'], restored['secret']
    except Exception as e:  # pylint: disable=broad-except  (any failure means: damaged)
      raise CheckpointDamaged(self.directory, step,
                             f'{type(e).__name__} reading its metadata') from e
    if not isinstance(meta, dict) or not isinstance(secret, dict) or 'arrays_digest' not in meta:
      raise CheckpointDamaged(self.directory, step, 'incomplete metadata')
    # Checkpoints of versions before 2026-12 carry no metadata digest: read as they were.
    if 'metadata_digest' in meta and meta['metadata_digest'] != metadata_digest(meta, secret):
      raise CheckpointDamaged(self.directory, step, 'its metadata do not match their digest')
    return meta, secret

  def restore_secret(self, step: int) -> dict[str, Any]:
    """The `secret` item of checkpoint `step` alone."""
    return self.read_json(step)[1]

  def restore(self, step: int, state_template, best_template):
    """Returns (state, best, meta) of checkpoint `step`, shaped like the templates.

    Raises CheckpointDamaged when an item cannot be read or the arrays do not match the
    digest saved with them.
    """
    meta, _ = self.read_json(step)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_unwrap_keys(state_template)),
          best=ocp.args.StandardRestore(_unwrap_keys(best_template))))
      state = _rewrap_keys(state_template, restored['state'])
      best = _rewrap_keys(best_template, restored['best'])
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointDamaged(self.directory, step,
                             f'{type(e).__name__} reading its arrays') from e
    if arrays_digest((state, best)) != meta['arrays_digest']:
      raise CheckpointDamaged(self.directory, step, 'its arrays do not match their digest')
    return state, best, meta

  def forget_removed(self) -> None:
    """Rereads the saved steps after checkpoints were deleted from the folder: orbax never
    saves at or behind a step it still believes saved."""
    self._manager.reload()

  def close(self) -> None:
    self._manager.close()
