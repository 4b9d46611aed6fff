"""Provenance and result files: every result says what produced it."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

_PACKAGES = ('dpjax', 'jax', 'jaxlib', 'flax', 'optax', 'dp-accounting', 'numpy',
             'tensorflow-datasets', 'orbax-checkpoint', 'pillow')


def versions() -> dict[str, str | None]:
  """Installed versions of the packages a result depends on, and the Python version."""
  found: dict[str, str | None] = {'python': platform.python_version()}
  for name in _PACKAGES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = None
  return found


def git_commit(path: Path | None = None) -> str | None:
  """The commit of the dpjax checkout, with '-dirty' when it has uncommitted changes."""
  where = path or Path(__file__).resolve().parent
  try:
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=where, capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=where,
                           capture_output=True, text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ('-dirty' if dirty else '')


def provenance() -> dict[str, Any]:
  import jax  # Deferred: keeps `versions()` usable without initialising a backend.
  return {'versions': versions(), 'commit': git_commit(),
          'devices': [str(d) for d in jax.devices()], 'platform': platform.platform()}


def _json_safe(value: Any) -> Any:
  """Non-finite floats become strings: JSON has no infinity, and null would read as 'unknown'."""
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if hasattr(value, 'item') and getattr(value, 'ndim', 1) == 0:
    return _json_safe(value.item())
  return value


def _umask() -> int:
  mask = os.umask(0)  # The only way to read it; set straight back.
  os.umask(mask)
  return mask


def write_json_atomic(path: Path, obj: Any, mode: int | None = None) -> None:
  """Writes through a temporary file and a rename, so a reader never sees half a file.

  `mode`: the file's permissions (e.g. 0o600 for a private record); None = an ordinary file
  (0666 less the umask).
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    # mkstemp makes 0600, so a private file is never readable by others, not even briefly.
    os.fchmod(fd, 0o666 & ~_umask() if mode is None else mode)
    with os.fdopen(fd, 'w') as f:
      json.dump(_json_safe(obj), f, indent=2, sort_keys=False)
      f.write('\n')
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


DATA_LISTING_FILE = 'data_listing.json'  # In the workdir: size, mtime and keyed hash per file.
_CHUNK = 1 << 20


def _file_hash(path: Path, salt: bytes) -> str:
  digest = hashlib.blake2b(key=salt, digest_size=32)
  with open(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def data_content_fingerprint(scan, salt: bytes, recorded: dict[str, Any] | None = None
                             ) -> tuple[str, dict[str, list]]:
  """(fingerprint, listing) of the data of `scan`, by what the files hold, keyed with `salt`.

  The fingerprint covers the dataset name and, per listed file of every split (in listing
  order): the split, its path relative to the data folder, its size, a keyed BLAKE2b of its
  bytes, its label, patient and example id; not its modification time, so data regenerated
  byte for byte (the demo after its cache was deleted) or copied without timestamps is the same
  data. `listing` maps each relative path to [size, mtime_ns, content hash]; given back as
  `recorded` (the listing saved with the run, same salt), a file whose size and mtime are
  unchanged is not read again, so only new or touched files cost I/O.
  """
  recorded = recorded or {}
  digest = hashlib.blake2b(key=salt, digest_size=32)
  digest.update(json.dumps(['dpjax-data-bytes-v1', scan.dataset]).encode())
  listing: dict[str, list] = {}
  for split in sorted(scan.splits):
    for record in scan.splits[split]:
      relative = record.path.relative_to(scan.root).as_posix()
      stat = os.stat(record.path)
      known = recorded.get(relative)
      if (isinstance(known, list) and len(known) == 3 and known[0] == stat.st_size
          and known[1] == stat.st_mtime_ns):
        content = known[2]
      else:
        content = _file_hash(record.path, salt)
      listing[relative] = [stat.st_size, stat.st_mtime_ns, content]
      digest.update(json.dumps([split, relative, stat.st_size, content, record.label,
                                record.patient, record.example_id]).encode())
      digest.update(b'\n')
  return digest.hexdigest(), listing


def read_data_listing(workdir: Path) -> dict[str, Any]:
  """The listing recorded in `workdir` ({} when none, or unreadable: then every file is read)."""
  try:
    listing = json.loads((Path(workdir) / DATA_LISTING_FILE).read_text())
  except (OSError, ValueError):
    return {}
  return listing if isinstance(listing, dict) else {}


def folder_digest(folder: Path) -> dict[str, str]:
  """{relative path: sha256} of every file under `folder` ({} when there is none)."""
  folder = Path(folder)
  found = {}
  for path in sorted(folder.rglob('*')) if folder.is_dir() else ():
    if path.is_file():
      digest = hashlib.sha256()
      with open(path, 'rb') as f:
        while chunk := f.read(_CHUNK):
          digest.update(chunk)
      found[path.relative_to(folder).as_posix()] = digest.hexdigest()
  return found


def digest_difference(recorded: dict[str, str], current: dict[str, str]) -> str:
  """'model.msgpack changed, x missing' ('' when they agree)."""
  names = sorted(set(recorded) | set(current))
  what = [f'{n} {"missing" if n not in current else "added" if n not in recorded else "changed"}'
          for n in names if recorded.get(n) != current.get(n)]
  return ', '.join(what[:3] + ([f'and {len(what) - 3} more'] if len(what) > 3 else []))
