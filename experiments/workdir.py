"""The run folder: can it be written, and is another run using it."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import jax

from experiments.config_checks import ConfigError


def check_writable_dir(path: Path, flag: str) -> None:
  """One line (exit 2) unless `path` is, or can be created as, a folder we may write in."""
  if path.exists() and not path.is_dir():
    raise ConfigError(f'{flag}={path} is a file, not a folder')
  existing = path
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f'{flag}={path} cannot be {"written" if existing == path else "created"}: '
                      f'no write access to {existing}')


class WorkdirLock:
  """An exclusive lock on a run folder (flock on the folder itself: no file is written).

  Two runs on one workdir would interleave checkpoints; the second exits 2 at once. Only the
  first process of a multi-host job takes it.
  """

  def __init__(self, workdir: Path):
    self.workdir = workdir
    self._fd = None

  def acquire(self) -> None:
    """Takes the lock (once the folder exists); exits 2 if another run holds it."""
    if self._fd is not None or jax.process_index() != 0:
      return
    fd = os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise ConfigError(f'--workdir={self.workdir} is in use by another run; wait for it to '
                        'finish or use another --workdir') from None
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # Closing the descriptor releases the lock.
      self._fd = None
