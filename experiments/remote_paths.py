"""Remote paths: `--data_dir`, `--workdir`, `--cache_dir`, `--weights` (and `$DPJAX_CACHE`) as URLs.

TPU users keep their data and run folders in a bucket: `gs://` (and `s3://`, `az://`, `hf://`,
every scheme of `etils.epath`) is accepted wherever a folder is. The run itself only ever sees
local folders: its workdir lock, its 0600 secret files, orbax's atomic renames and the atomic
JSON writes all need a POSIX file system, which a bucket is not. So a remote path is STAGED:

* A data folder (`--data_dir`, the grid's `--pneumonia_dir` / `--aptos_dir`) or weights file is
  copied once into `<staging>/remote/<kind>/<scheme>/<bucket>/<path>`; a marker file beside the
  copy, written last, lists what was copied. A copy without a marker (interrupted) is completed
  before use, never used half-made; a remote whose listing (names, sizes, times) changed is
  copied again (changed files only), so the run always sees what the bucket holds.
* The workdir is pulled at the start (so that a run killed on one VM resumes on another, and a
  finished one is reused) and pushed back by process 0: every `DPJAX_SYNC_EVERY_S` seconds
  (default 120; 0 = only at the end) while the run goes on, at the end, and when the run stops
  on an error, Ctrl-C or SIGTERM (a preempted VM: at most `DPJAX_SYNC_ON_EXIT_S` seconds, see
  `experiments.cli.on_signal_exit`). Only finished files travel: orbax's temporary folders
  (`*.orbax-checkpoint-tmp*`), temporary files (`*.tmp`) and lock files never do. A push
  uploads new and changed files first (results.json, which marks a run finished, last) and
  only then deletes remotely what the run deleted (old checkpoints; all of them once finished),
  so the bucket always holds at least one complete checkpoint. A pull keeps local files that
  are newer than the bucket's (the record `<copy>.dpjax-sync.json` says what was exchanged).
* A remote cache is pulled at the start and pushed at the end, but only adds: files missing on
  one side are copied, nothing is overwritten or deleted (several VMs may share one cache). It
  holds prepared copies of the data and the cache's secret salt: a private bucket too.

`<staging>` is `$DPJAX_STAGING` if set, else the local cache (`--cache_dir`, `$DPJAX_CACHE`, or
`~/.cache/dpjax`).

SECRETS GO TO THE BUCKET. A resume or a reuse on another VM needs the run's secrets, so the
workdir push copies them: `secret_salt` (keys the data fingerprint), `data_listing.json` and
`results.json` (the curator's records, 0600 locally) and the checkpoints, whose `secret` item
and optimizer state hold the run's noise key (with it, the noise can be subtracted from the
released model). The bucket of `--workdir` must therefore be PRIVATE to the curator: only
`release/` may be published. Every run that pushes says so in one line. Pulled files are 0600
(folders 0700) except under `release/`.

Limits: two VMs must not run on one remote workdir at once (a bucket has no lock; on one VM the
local lock refuses the second run). A job of several processes (`--distributed`,
`--coordinator_address` with `--num_processes` > 1) is refused a remote workdir: orbax's
multi-process checkpoints are written by every process into ONE folder, which per-machine
copies are not (its first save would wait forever); such a job needs a shared file system for
its workdir. Its data and cache may be remote (each machine copies them; process 0 pushes).

Use: `with remote_paths.staged(config) as config:` around `train.train_and_evaluate(config)`
(experiments.run does), `with remote_paths.staged_grid(args) as args:` in the grid. A missing
remote, an unsupported scheme or a bucket that cannot be written is refused in one line
(ConfigError, exit 2) before anything runs; a push that fails at the end raises PushFailed
(exit 4: the files are in the local copy, and rerunning the same command pushes them).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import copy
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from experiments.config_checks import ConfigError

SCHEMES = ('gs', 's3', 'az', 'hf')  # etils.epath's URL schemes.
KINDS = ('data', 'weights', 'workdir', 'cache')
STAGING_ENV = 'DPJAX_STAGING'
SYNC_EVERY_ENV = 'DPJAX_SYNC_EVERY_S'
SYNC_EVERY_S = 120
MARKER_SUFFIX = '.dpjax-staged.json'  # Beside a data copy: written last, once it is complete.
RECORD_SUFFIX = '.dpjax-sync.json'  # Beside a synced copy: what was last exchanged, per file.
LOCK_SUFFIX = '.dpjax-staging.lock'
LAST_FILES = ('results.json',)  # Pushed after everything else: it marks a run finished.
_WORKERS = 16  # Parallel requests: a bucket answers each in tens of milliseconds.
_CHUNK = 1 << 22
SECRETS_NOTE = ('it receives the run\'s secrets (secret_salt, data_listing.json, results.json and '
                'the checkpoints, which hold the noise key; with object versioning or soft '
                'delete, deleted checkpoints stay recoverable) and the training statistics in '
                'not_covered/: keep that bucket private; only release/ may be published')


class PushFailed(Exception):
  """The files of a finished (or stopped) run could not be copied to the bucket."""
  exit_code = 4  # Like a full disk: nothing is wrong with the run; rerun to push.


def is_url(path: Any) -> bool:
  return '://' in str(path or '')


def _say(line: str) -> None:
  sys.stderr.write(line + '\n')
  sys.stderr.flush()


def _epath(url: str, flag: str):
  """The etils.epath.Path of `url`; ConfigError for a scheme epath cannot open."""
  scheme, _, rest = url.partition('://')
  if scheme not in SCHEMES:
    raise ConfigError(f'{flag}={url}: unsupported URL scheme {scheme}://; use a local path or '
                      f'{", ".join(s + "://" for s in SCHEMES)}')
  parts = [p for p in rest.split('/') if p]
  if not parts or any(p in ('.', '..') for p in parts):
    raise ConfigError(f'{flag}={url}: expected {scheme}://BUCKET/PATH')
  from etils import epath  # Deferred: only remote runs need it.
  return epath.Path(url)


def check_url(url: str, flag: str) -> None:
  """ConfigError (one line) unless `url` is a URL that etils.epath can open; no request made."""
  _epath(url, flag)


def _reason(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0][:200]}' if text else type(error).__name__


def staging_root(cache_dir: str = '') -> Path:
  """Where local copies of remote paths go: $DPJAX_STAGING, else the local cache root."""
  env = os.environ.get(STAGING_ENV, '')
  if env:
    if is_url(env):
      raise ConfigError(f'${STAGING_ENV}={env}: must be a local folder')
    return Path(env).expanduser()
  for candidate in (cache_dir, os.environ.get('DPJAX_CACHE', '')):
    if candidate and not is_url(candidate):
      return Path(candidate).expanduser()
  return Path.home() / '.cache' / 'dpjax'


def local_path(root: Path, kind: str, url: str) -> Path:
  """`<root>/remote/<kind>/<scheme>/<bucket>/<path>`: one local copy per remote path."""
  scheme, _, rest = url.partition('://')
  return Path(root).absolute() / 'remote' / kind / scheme / Path(*[p for p in rest.split('/') if p])


def original_path(path: str) -> str:
  """The URL that a staged local copy (`local_path`) was made from; any other path unchanged.

  A pure function of the string (no file is read): for comparing a saved run's paths with the
  current ones, whichever machine or staging folder made the copy.
  """
  parts = Path(str(path)).parts
  for i in range(len(parts) - 4, -1, -1):
    if parts[i] == 'remote' and parts[i + 1] in KINDS and parts[i + 2] in SCHEMES:
      return f'{parts[i + 2]}://' + '/'.join(parts[i + 3:])
  return str(path)


def excluded(rel: str, kind: str) -> bool:
  """Files of a synced folder that never travel: unfinished writes, locks, and what the cache
  rebuilds itself. A data copy takes every file."""
  if kind not in ('workdir', 'cache'):
    return False
  parts = rel.split('/')
  for part in parts:
    if ('.orbax-checkpoint-tmp' in part or part.startswith('incomplete.') or '.tmp-' in part
        or part.endswith(('.tmp', '.lock', '.part', MARKER_SUFFIX, RECORD_SUFFIX, LOCK_SUFFIX))):
      return True
  # The demo data are regenerated in seconds; remote/ is where local copies go.
  return kind == 'cache' and parts[0] in ('demo', 'remote')


# ---------------------------------------------------------------------------- listings


def _key(path) -> str:
  """'bucket/a/b' for gs://bucket/a/b and for the scheme-less roots some backends' walk yields."""
  text = os.fspath(path)
  return (text.split('://', 1)[1] if '://' in text else text).strip('/')


def _remote_listing(top, flag: str, kind: str) -> dict[str, list[int]]:
  """{relative path: [size, mtime]} of every file under the remote `top` ('' for a file)."""
  try:
    if not top.is_dir():
      st = top.stat()
      return {'': [int(st.length), int(st.mtime or 0)]}
    top_key, names = _key(top), []
    for root, _, files in top.walk():
      root_key = _key(root)
      rel_dir = '' if root_key == top_key else root_key[len(top_key) + 1:]
      if root_key != top_key and not root_key.startswith(top_key + '/'):
        raise RuntimeError(f'listing {top} yielded {root}')
      names += [f'{rel_dir}/{name}' if rel_dir else name for name in files]
    names = [n for n in names if not excluded(n, kind)]

    def stat(name):
      st = (top / name).stat()
      return name, [int(st.length), int(st.mtime or 0)]

    with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
      return dict(pool.map(stat, sorted(names)))
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (every backend has its own errors)
    raise ConfigError(f'{flag}={top}: cannot be listed ({_reason(e)})') from None


def _local_listing(top: Path, kind: str) -> dict[str, list[int]]:
  """{relative path: [size, mtime_ns]} of the local files under `top` that may travel."""
  listing = {}
  for root, dirs, files in os.walk(top):
    rel_dir = os.path.relpath(root, top)
    rel_dir = '' if rel_dir == '.' else rel_dir.replace(os.sep, '/')
    dirs[:] = [d for d in dirs if not excluded(f'{rel_dir}/{d}' if rel_dir else d, kind)]
    for name in files:
      rel = f'{rel_dir}/{name}' if rel_dir else name
      if excluded(rel, kind):
        continue
      try:
        st = os.stat(os.path.join(root, name))
      except FileNotFoundError:  # Deleted meanwhile (an old checkpoint).
        continue
      listing[rel] = [st.st_size, st.st_mtime_ns]
  return listing


def _local_stamp(path: Path) -> list[int]:
  st = os.stat(path)
  return [st.st_size, st.st_mtime_ns]


def _private(rel: str) -> bool:
  return rel.split('/')[0] != 'release'


def _download(src, dst: Path, private: bool, mtime: int = 0) -> None:
  """Copies the remote file `src` to `dst` through a temporary file: complete or absent."""
  dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o755)
  fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f'.{dst.name}.', suffix='.tmp')  # 0600.
  try:
    with os.fdopen(fd, 'wb') as out, src.open('rb') as f:
      shutil.copyfileobj(f, out, _CHUNK)
    if not private:
      os.chmod(tmp, 0o644)
    if mtime:
      os.utime(tmp, (mtime, mtime))
    os.replace(tmp, dst)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def _upload(src: Path, dst) -> None:
  """Copies the local file `src` to the remote `dst` (an object appears whole on close)."""
  with open(src, 'rb') as f, dst.open('wb') as out:
    shutil.copyfileobj(f, out, _CHUNK)


def _read_json(path: Path) -> dict[str, Any]:
  try:
    value = json.loads(path.read_text())
  except (OSError, ValueError):
    return {}
  return value if isinstance(value, dict) else {}


def _write_json(path: Path, value: dict[str, Any]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(value, f)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


@contextlib.contextmanager
def _flock(path: Path, blocking: bool, busy: Callable[[], Exception] | None = None):
  """An exclusive flock on `path` for the block; `busy()` is raised when not blocking and held."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      if not blocking:
        raise busy() from None
      _say(f'waiting for another process copying into {path.with_name(path.name[:-len(LOCK_SUFFIX)])}')
      fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()}\n'.encode(), 0)
    yield
  finally:
    os.close(fd)


def _size(num_bytes: int) -> str:
  for unit in ('B', 'KB', 'MB', 'GB'):
    if num_bytes < 1000 or unit == 'GB':
      return f'{num_bytes:.0f} {unit}' if unit == 'B' else f'{num_bytes:.1f} {unit}'
    num_bytes /= 1000
  return ''


def _require(remote, url: str, flag: str) -> None:
  try:
    found = remote.exists()
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f'{flag}={url} cannot be reached ({_reason(e)})') from None
  if not found:
    raise ConfigError(f'{flag}={url}: no such file or folder in the bucket')


# ------------------------------------------------------------------- read-only copies


def stage_read_only(url: str, flag: str, root: Path, kind: str = 'data') -> Path:
  """The local copy of the remote data folder (or file) `url`, made or updated as needed.

  Complete or redone: the marker beside the copy is written last and names what was copied; a
  copy without it, or whose remote listing changed since, is brought up to date (changed files
  only) before it is used. Processes of one machine wait for each other's copy.
  """
  remote = _epath(url, flag)
  _require(remote, url, flag)
  local = local_path(root, kind, url)
  marker = local.with_name(local.name + MARKER_SUFFIX)
  with _flock(local.with_name(local.name + LOCK_SUFFIX), blocking=True):
    listing = _remote_listing(remote, flag, kind)
    old = _read_json(marker)
    if old.get('url') == url and old.get('listing') == listing and _matches(local, listing):
      return local
    marker.unlink(missing_ok=True)  # Before anything changes: an interruption is redone.
    # A local file with the remote size and time is a complete earlier copy (written whole,
    # then given the remote time): an interrupted copy goes on where it stopped.
    todo = {rel: stamp for rel, stamp in listing.items()
            if not (stamp[1] and _same_file(local / rel if rel else local, stamp))}
    need = sum(size for size, _ in todo.values())
    _check_space(local, need, flag, url)
    _say(f'note: {flag}={url}: copying {len(todo)} of {len(listing)} files ({_size(need)}) into '
         f'{local} (kept: later runs copy only what changed)')
    if '' in listing and local.is_dir():
      shutil.rmtree(local)
    elif '' not in listing and local.is_file():
      local.unlink()
    start = time.monotonic()

    def fetch(rel):
      src, dst = (remote, local) if rel == '' else (remote / rel, local / rel)
      _download(src, dst, private=True, mtime=listing[rel][1])

    try:
      with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
        list(pool.map(fetch, sorted(todo)))
    except FileNotFoundError as e:
      raise ConfigError(f'{flag}={url} changed while it was copied ({_reason(e)}); run again') from None
    except OSError as e:
      from experiments.checkpoint import DiskFull
      from experiments.checkpoint import is_disk_full
      if is_disk_full(e):
        raise DiskFull(local, f'copying {url}') from e
      raise
    if '' not in listing:  # Files the remote no longer has would change the data.
      for rel in set(_local_listing(local, kind)) - set(listing):
        (local / rel).unlink()
    _write_json(marker, {'url': url, 'listing': listing, 'copied': time.time()})
    _say(f'note: {flag}: copied in {time.monotonic() - start:.0f} s')
  return local


def _matches(local: Path, listing: dict[str, list[int]]) -> bool:
  """Whether every listed file is there locally with its size (a cheap local check)."""
  try:
    return all(os.stat(local / rel if rel else local).st_size == size
               for rel, (size, _) in listing.items())
  except OSError:
    return False


def _same_file(path: Path, stamp: list[int]) -> bool:
  try:
    st = os.stat(path)
  except OSError:
    return False
  return [st.st_size, int(st.st_mtime)] == stamp


def _check_space(local: Path, need: int, flag: str, url: str) -> None:
  existing = local
  while not existing.exists():
    existing = existing.parent
  free = shutil.disk_usage(existing).free
  if need > free:
    raise ConfigError(f'{flag}={url}: its copy needs {_size(need)} in {existing}, which has '
                      f'{_size(free)} free; free space or set ${STAGING_ENV} to a larger disk')


# ----------------------------------------------------------------------- synced folders


class SyncedFolder:
  """A local copy of a remote folder, pulled at the start and pushed back.

  mirror=True (a workdir): three-way, against the record of what was last exchanged; a file
  the run changed or made is uploaded, a file the run deleted is deleted remotely, a file that
  changed remotely since (another VM) is downloaded. mirror=False (a cache): only adds.
  """

  def __init__(self, url: str, flag: str, local: Path, kind: str, mirror: bool):
    self.url, self.flag, self.local, self.kind, self.mirror = url, flag, Path(local), kind, mirror
    self.remote = _epath(url, flag)
    self.record_path = self.local.with_name(self.local.name + RECORD_SUFFIX)
    self.files: dict[str, dict[str, list[int]]] = {}  # rel -> {'local': stamp, 'remote': stamp}
    self._lock = threading.Lock()

  def check_writable(self) -> None:
    """ConfigError unless the bucket takes a file here (written and deleted at once)."""
    try:
      if self.remote.exists() and not self.remote.is_dir():
        raise ConfigError(f'{self.flag}={self.url} is a file, not a folder')
      probe = self.remote / f'.dpjax-write-check-{socket.gethostname()}-{os.getpid()}'
      with probe.open('w') as f:
        f.write('dpjax checks that it may write here; delete me if I stay\n')
      probe.unlink(missing_ok=True)
    except ConfigError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f'{self.flag}={self.url} cannot be written ({_reason(e)})') from None

  def pull(self) -> int:
    """Brings the local copy up to date with the bucket; returns the number of files copied."""
    exists = self.remote.exists()
    listing = _remote_listing(self.remote, self.flag, self.kind) if exists else {}
    listing.pop('', None)
    record = _read_json(self.record_path)
    self.files = record.get('files', {}) if record.get('url') == self.url else {}
    if self.mirror and not exists and self.files and self.local.is_dir():
      # Never wipe a copy on one answer: the user says which of the two is to go.
      raise ConfigError(f'{self.flag}={self.url} no longer exists, but its local copy '
                        f'{self.local} holds what was copied there: delete that copy (and '
                        f'{self.record_path.name} beside it) to start afresh, or restore the '
                        'bucket\'s folder')
    local = _local_listing(self.local, self.kind) if self.local.is_dir() else {}
    if self.mirror:  # Missing here, or changed remotely since it was last exchanged.
      todo = [rel for rel, stamp in listing.items()
              if rel not in local or self.files.get(rel, {}).get('remote') != stamp]
    else:
      todo = [rel for rel in listing if rel not in local]
    need = sum(listing[rel][0] for rel in todo)
    if todo:
      _check_space(self.local, need, self.flag, self.url)
      _say(f'note: {self.flag}={self.url}: copying {len(todo)} files ({_size(need)}) into '
           f'{self.local}')

    def fetch(rel):
      _download(self.remote / rel, self.local / rel, private=_private(rel) or self.kind != 'workdir')
      return rel, {'local': _local_stamp(self.local / rel), 'remote': listing[rel]}

    self.local.mkdir(parents=True, exist_ok=True)
    try:
      with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
        self.files.update(pool.map(fetch, sorted(todo)))
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f'{self.flag}={self.url} cannot be copied ({_reason(e)}); the local '
                        f'copy {self.local} is unchanged where not copied yet: run again') from None
    if self.mirror:
      for rel in set(local) - set(listing):
        if rel in self.files:  # Exchanged before, deleted remotely since: deleted here too.
          (self.local / rel).unlink(missing_ok=True)
      self.files = {rel: v for rel, v in self.files.items()
                    if rel in listing or (self.local / rel).exists()}
    else:
      self.files = {rel: {'local': [], 'remote': stamp} for rel, stamp in listing.items()}
    self._save_record()
    return len(todo)

  def push(self) -> int:
    """Uploads what changed locally, then (mirror) deletes what was deleted; returns the count.

    Raises whatever the bucket raised; files done so far are recorded.
    """
    with self._lock:
      local = _local_listing(self.local, self.kind)
      if self.mirror:
        todo = [rel for rel, stamp in local.items() if self.files.get(rel, {}).get('local') != stamp]
      else:
        todo = [rel for rel in local if rel not in self.files]
      todo.sort(key=lambda rel: (rel in LAST_FILES, rel))
      last = [rel for rel in todo if rel in LAST_FILES]
      first = [rel for rel in todo if rel not in LAST_FILES]
      try:
        with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
          for batch in (first, last):
            for rel, entry in pool.map(self._push_one, batch, [local[r] for r in batch]):
              if entry is not None:
                self.files[rel] = entry
        if self.mirror:
          gone = [rel for rel in self.files if rel not in local]
          for rel in gone:
            (self.remote / rel).unlink(missing_ok=True)
            del self.files[rel]
          self._remove_remote_folders(gone)
      finally:
        self._save_record()
      return len(todo)

  def _push_one(self, rel: str, stamp: list[int]):
    src, dst = self.local / rel, self.remote / rel
    try:
      _upload(src, dst)
    except FileNotFoundError:
      if src.exists():
        raise
      return rel, None  # Deleted locally meanwhile (an old checkpoint): the next push deletes it.
    if _local_stamp(src) != stamp:
      return rel, None  # Changed while it was copied: copied again next time.
    st = dst.stat()
    return rel, {'local': stamp, 'remote': [int(st.length), int(st.mtime or 0)]}

  def _remove_remote_folders(self, gone: list[str]) -> None:
    """Remote folders of deleted files that are gone locally too (an old checkpoint's)."""
    folders = set()
    for rel in gone:
      parts = rel.split('/')[:-1]
      for depth in range(1, len(parts) + 1):
        if not (self.local / '/'.join(parts[:depth])).exists():
          folders.add('/'.join(parts[:depth]))
          break
    for folder in sorted(folders):
      with contextlib.suppress(Exception):  # Buckets have no folders; other backends may.
        (self.remote / folder).rmtree(missing_ok=True)

  def _save_record(self) -> None:
    _write_json(self.record_path, {'url': self.url, 'files': self.files})


class _Pusher:
  """Pushes a synced folder every `every_s` seconds in a daemon thread (process 0 only)."""

  def __init__(self, folder: SyncedFolder, every_s: float, pushes: Callable[[], bool]):
    self.folder, self.every_s, self.pushes = folder, every_s, pushes
    self._stop = threading.Event()
    self._warned = False
    self.thread = threading.Thread(target=self._run, daemon=True, name='dpjax-push')

  def start(self) -> None:
    if self.every_s > 0:
      self.thread.start()

  def _run(self) -> None:
    while not self._stop.wait(self.every_s):
      if not self.pushes():
        continue
      try:
        self.folder.push()
        self._warned = False
      except Exception as e:  # pylint: disable=broad-except  (the run goes on; retried)
        if not self._warned:
          _say(f'warning: copying to {self.folder.flag}={self.folder.url} failed ({_reason(e)}); '
               f'retried every {self.every_s:g} s, the run goes on in {self.folder.local}')
          self._warned = True

  def stop(self) -> None:
    self._stop.set()
    if self.thread.is_alive():
      self.thread.join()


def sync_every_s() -> float:
  try:
    return max(0.0, float(os.environ.get(SYNC_EVERY_ENV, SYNC_EVERY_S)))
  except ValueError:
    raise ConfigError(f'${SYNC_EVERY_ENV} must be a number of seconds, got '
                      f'{os.environ[SYNC_EVERY_ENV]!r}') from None


def _first_process(multi_process: bool) -> bool:
  """Whether this process pushes: the only one, or process 0 once the job has gathered (JAX is
  not touched before: asking for the process index would start its backend too early)."""
  if not multi_process:
    return True
  import jax
  return jax.distributed.is_initialized() and jax.process_index() == 0


# ------------------------------------------------------------------------------ staging


@contextlib.contextmanager
def staged_paths(read_only: dict[str, tuple[str, str]], workdir: tuple[str, str] | None = None,
                 cache: tuple[str, str] | None = None, local_cache_dir: str = '',
                 multi_process: bool = False) -> Iterator[dict[str, str]]:
  """Local copies of remote paths for the block; pushes the workdir (and cache) back after it.

  read_only: {name: (flag, url)} copied once (`stage_read_only`); workdir, cache: (flag, url)
  or None. Yields {name: local path}, with 'workdir' and 'cache' for those given.
  """
  root = staging_root(local_cache_dir)
  for flag, url in [*read_only.values(), *(p for p in (workdir, cache) if p)]:
    check_url(url, flag)
  if workdir and multi_process:
    raise ConfigError(f'{workdir[0]}={workdir[1]}: a job of several processes writes its '
                      'checkpoints from every process into one folder, and a bucket is copied per '
                      f'machine; give {workdir[0]} a folder on a file system that every process '
                      'sees (--data_dir and --cache_dir may stay in the bucket)')
  local: dict[str, str] = {}
  synced: list[SyncedFolder] = []
  with contextlib.ExitStack() as stack:
    # The cheap refusals first (a busy or unwritable workdir), before any data are copied.
    run_folder = cache_folder = pusher = None
    if workdir:
      flag, url = workdir
      path = local_path(root, 'workdir', url)
      stack.enter_context(_flock(path.with_name(path.name + LOCK_SUFFIX), blocking=False, busy=lambda: ConfigError(
          f'{flag}={url} is in use by another run on this machine (its local copy {path}); wait '
          f'for it to finish or use another {flag}')))
      run_folder = SyncedFolder(url, flag, path, 'workdir', mirror=True)
      run_folder.check_writable()
    if cache:
      flag, url = cache
      cache_folder = SyncedFolder(url, flag, local_path(root, 'cache', url), 'cache', mirror=False)
      cache_folder.check_writable()
    for name, (flag, url) in read_only.items():
      local[name] = str(stage_read_only(url, flag, root, 'weights' if name == 'weights' else 'data'))
    if cache_folder is not None:
      copied = cache_folder.pull()
      _say(f'note: {cache_folder.flag}={cache_folder.url} is used through the local copy '
           f'{cache_folder.local} ({copied} files pulled), new files copied back at the end; it '
           'receives prepared copies of the data and the cache\'s secret salt: keep that bucket '
           'private')
      local['cache'] = str(cache_folder.local)
      synced.append(cache_folder)
    if run_folder is not None:
      copied = run_folder.pull()
      _say(f'note: {run_folder.flag}={run_folder.url} runs in the local copy {run_folder.local} '
           f'({copied} files pulled), copied back as it goes and at the end; {SECRETS_NOTE}')
      local['workdir'] = str(run_folder.local)
      synced.append(run_folder)
      pusher = _Pusher(run_folder, sync_every_s(), lambda: _first_process(multi_process))
    if not synced:
      yield local
      return

    def push_all(on_signal: bool = False) -> None:
      if not _first_process(multi_process):
        return
      for folder in synced:
        if on_signal and folder.kind != 'workdir':
          continue
        if on_signal:
          _say(f'copying the finished files to {folder.url} (Ctrl-C again to skip)')
        count = folder.push()
        if count and not on_signal:
          _say(f'note: copied {count} files to {folder.flag}={folder.url}')

    from experiments import cli  # Deferred: no cycle at import.
    remove_hook = cli.on_signal_exit(lambda: push_all(on_signal=True))
    stack.callback(remove_hook)
    if pusher is not None:
      pusher.start()
      stack.callback(pusher.stop)
    try:
      yield local
    except BaseException:
      with contextlib.suppress(Exception):
        if pusher is not None:
          pusher.stop()
      try:
        push_all()
      except Exception as e:  # pylint: disable=broad-except  (the run's own error comes first)
        _say(f'warning: copying back to the bucket failed ({_reason(e)}); the files are in '
             f'{", ".join(str(f.local) for f in synced)}: rerun the same command to copy them')
      raise
    if pusher is not None:
      pusher.stop()
    try:
      push_all()
    except Exception as e:  # pylint: disable=broad-except
      names = ', '.join(f'{f.flag}={f.url}' for f in synced)
      raise PushFailed(f'copying to {names} failed ({_reason(e)}); the files are in '
                       f'{", ".join(str(f.local) for f in synced)}: run the same command again '
                       'to copy them (nothing is recomputed)') from e


def _get(obj, name: str, default: Any = '') -> Any:
  return getattr(obj, name, default) if not isinstance(obj, dict) else obj.get(name, default)


def _remote_cache(obj) -> tuple[str, str] | None:
  """(flag, url) of a remote cache: --cache_dir's, or $DPJAX_CACHE's when --cache_dir is empty."""
  cache_dir = _get(obj, 'cache_dir')
  if is_url(cache_dir):
    return '--cache_dir', cache_dir
  if not cache_dir and is_url(os.environ.get('DPJAX_CACHE', '')):
    return '$DPJAX_CACHE', os.environ['DPJAX_CACHE']
  return None


@contextlib.contextmanager
def _env_cache(path: str | None) -> Iterator[None]:
  """$DPJAX_CACHE set to `path` for the block (when the cache is remote)."""
  if path is None:
    yield
    return
  before = os.environ.get('DPJAX_CACHE')
  os.environ['DPJAX_CACHE'] = path
  try:
    yield
  finally:
    if before is None:
      os.environ.pop('DPJAX_CACHE', None)
    else:
      os.environ['DPJAX_CACHE'] = before


@contextlib.contextmanager
def staged(config, read_only: tuple[str, ...] = ('data_dir', 'weights')) -> Iterator[Any]:
  """`config` with its remote paths made local for the block, pushed back after it.

  The run's config (`experiments.configs.default`): `data_dir` and a `weights` path are copied
  once, `workdir` and `cache_dir` (or $DPJAX_CACHE) are synced. Without a remote path it yields
  `config` itself and does nothing else.
  """
  remote = {name: (f'--{name}', _get(config, name)) for name in read_only
            if is_url(_get(config, name))}
  workdir = _get(config, 'workdir')
  workdir = ('--workdir', workdir) if is_url(workdir) else None
  cache = _remote_cache(config)
  if not (remote or workdir or cache):
    yield config
    return
  multi = bool(_get(config, 'distributed', False) or (
      _get(config, 'coordinator_address', '') and _get(config, 'num_processes', 0) != 1))
  local_cache = '' if cache else _get(config, 'cache_dir')
  with staged_paths(remote, workdir, cache, local_cache, multi_process=multi) as local:
    config = copy.deepcopy(config)
    for name in remote:
      setattr(config, name, local[name])
    if workdir:
      config.workdir = local['workdir']
    if cache:
      config.cache_dir = local['cache']
    with _env_cache(local.get('cache') if cache else None):
      yield config


GRID_DATA_FLAGS = ('data_dir', 'pneumonia_dir', 'aptos_dir')


@contextlib.contextmanager
def staged_grid(args: argparse.Namespace) -> Iterator[argparse.Namespace]:
  """The grid's flags with remote paths made local for the block (its data folders, its
  workdir, a `--set cache_dir=URL` or $DPJAX_CACHE), pushed back after it."""
  remote = {name: (f'--{name}', getattr(args, name, '')) for name in GRID_DATA_FLAGS
            if is_url(getattr(args, name, ''))}
  workdir = ('--workdir', args.workdir) if is_url(args.workdir) else None
  sets = {text.partition('=')[0].strip(): text.partition('=')[2].strip() for text in args.set}
  cache = _remote_cache({'cache_dir': sets.get('cache_dir', '')})
  if cache and cache[0] == '--cache_dir':
    cache = ('--set cache_dir', cache[1])
  if not (remote or workdir or cache):
    yield args
    return
  multi = bool((sets.get('coordinator_address') and sets.get('num_processes', '0') != '1')
               or sets.get('distributed', '').lower() in ('1', 'true', 'yes'))
  local_cache = '' if cache else sets.get('cache_dir', '')
  with staged_paths(remote, workdir, cache, local_cache, multi_process=multi) as local:
    args = argparse.Namespace(**vars(args))
    for name in remote:
      setattr(args, name, local[name])
    if workdir:
      args.workdir = local['workdir']
    if cache and cache[0] == '--set cache_dir':
      args.set = [t for t in args.set if t.partition('=')[0].strip() != 'cache_dir']
      args.set.append(f'cache_dir={local["cache"]}')
    with _env_cache(local.get('cache') if cache else None):
      yield args
