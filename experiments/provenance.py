"""Provenance and result files: every result says what produced it."""

from __future__ import annotations

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


def write_json_atomic(path: Path, obj: Any) -> None:
  """Writes through a temporary file and a rename, so a reader never sees half a file."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a results file is an ordinary file.
    with os.fdopen(fd, 'w') as f:
      json.dump(_json_safe(obj), f, indent=2, sort_keys=False)
      f.write('\n')
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
