"""The run folder: can it be written, and is another run using it."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

import jax

from experiments import remote_paths
from experiments.config_checks import ConfigError


def check_writable_dir(path: Path, flag: str) -> None:
  """One line (exit 2) unless `path` is, or can be created as, a folder we may write in."""
  if str(path).startswith(tuple(f'{s}:/' for s in remote_paths.SCHEMES)):  # A URL that Path() mangled.
    url = str(path).replace(':/', '://', 1)
    raise ConfigError(f'{flag}={url}: a bucket is not a local folder; python -m experiments.run '
                      'and experiments.grid copy it (from Python: `with experiments.remote_paths.'
                      'staged(config) as config:` around the call)')
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


class FolderLock:
  """An exclusive lock on a folder through the file `<folder>/<name>`, which names its holder.

  flock on that file: the kernel drops it when the holder exits, even by `kill -9`, so a lock
  left by a dead process is simply taken over; the file's text (pid and host) only tells a
  refused user who holds it. Refusal: one line (ConfigError, exit 2) naming the folder.
  """

  def __init__(self, folder: Path, name: str, what: str):
    self.folder, self.path, self.what = Path(folder), Path(folder) / name, what
    self._fd = None

  def acquire(self) -> None:
    if self._fd is not None:
      return
    self.folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors='replace').strip() or 'another process'
      os.close(fd)
      raise ConfigError(f'{self.folder} is in use by {self.what} ({holder}); wait for it to '
                        'finish or use another folder') from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()}\n'.encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      os.close(self._fd)  # Closing the descriptor releases the lock.
      self._fd = None

  def __enter__(self) -> FolderLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
