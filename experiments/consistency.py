"""The processes of one job must be started alike: the same settings, the same data.

Every process of a multi-host job builds its part of the run from its own flags and its own
copy of the data, and nothing else makes them agree. A process started with another
--l2_norm_clip clips with its own C while process 0 publishes C=1 and its epsilon; a data copy
that lacks one patient maps the one Poisson sample of every step onto other examples, so the
batch is stitched from two different samples. Before anything is prepared or trained, every
process therefore gathers the digests of every other process and compares them with process
0's; on any difference every process stops with the same one line (a `ConfigError`: exit 2).

What must agree:

* Settings: every field of the run's config fingerprint (all but the deployment fields: where
  the run writes, how it shows progress, how the processes meet, where features are computed),
  except `data_dir`, compared by presence only (a data folder or the demo data): the same
  data may lie under another path on each host, and the data themselves are compared next.
  `--weights` is compared as spelled: give every host the same path to the same file.
* Data: a digest of the listing of every split (per file: its path relative to the data
  folder, its size, label, patient and example id), keyed with the run's secret salt, which is
  process 0's on every process. Modification times are left out (a copy made without them
  holds the same images); contents of the same size are not read.

Only digests travel between the processes; none is printed or written, and the data digest is
keyed, so it tells nothing about the data to whoever sees the job's traffic without the salt.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax

from experiments import parallel
from experiments.config_checks import ConfigError

# Fields whose value may differ between hosts and is compared in another form.
COMPARED_BY_PRESENCE = ('data_dir',)


def job_settings(fingerprint: dict[str, Any]) -> dict[str, Any]:
  """The settings every process of a job must share: the config fingerprint, with the fields
  of `COMPARED_BY_PRESENCE` reduced to whether they are set."""
  return {k: (bool(v) if k in COMPARED_BY_PRESENCE else v) for k, v in fingerprint.items()}


def _words(data: bytes, count: int) -> list[int]:
  """The first `count` uint32 words of the SHA-256 of `data`."""
  digest = hashlib.sha256(data).digest()
  return [int.from_bytes(digest[4 * i:4 * i + 4], 'little') for i in range(count)]


def _encode(value: Any) -> bytes:
  return json.dumps(value, sort_keys=True, default=repr).encode()


def _processes(numbers: list[int]) -> str:
  return ('process ' if len(numbers) == 1 else 'processes ') + ', '.join(map(str, numbers))


def check_same_settings(settings: dict[str, Any]) -> None:
  """Refuses (ConfigError on every process) a job whose processes have other settings than
  process 0, naming the flags. Collective: every process must call it."""
  if jax.process_count() == 1:
    return
  names = sorted(settings)
  # 64 bits per digest: an accidental collision among a job's processes is out of reach.
  header = [len(names), *_words(_encode(names), 2), *_words(_encode(settings), 2)]
  everyone = parallel.gather_from_all_processes(header)
  if all(row == everyone[0] for row in everyone):
    return
  others = [p for p, row in enumerate(everyone) if row != everyone[0]]
  if any(row[:3] != everyone[0][:3] for row in everyone):
    raise ConfigError(f'{_processes(others)} of this job run another dpjax version than '
                      'process 0 (their settings have other fields); install the same version '
                      'on every host')
  # Same fields everywhere (so the same shape): one digest per field names what differs.
  per_field = parallel.gather_from_all_processes(
      [w for name in names for w in _words(_encode(settings[name]), 2)])
  differing = [name for i, name in enumerate(names)
               if any(row[2 * i:2 * i + 2] != per_field[0][2 * i:2 * i + 2] for row in per_field)]
  flags = ', '.join(f'--{name}' for name in differing)
  raise ConfigError(f'the processes of this job were started with different settings: {flags} '
                    f'on {_processes(others)} differ from process 0; start every process with '
                    'the same flags')


def data_digest(scan, salt: bytes) -> bytes:
  """Keyed BLAKE2b-256 of the scanned listing, independent of where the folder is and of file
  times (see the module docstring). Never shown: compared in memory only."""
  digest = hashlib.blake2b(key=salt, digest_size=32)
  digest.update(_encode(['dpjax-job-data-v1', scan.dataset]))
  for split in sorted(scan.splits):
    for record in scan.splits[split]:
      digest.update(_encode([split, record.path.relative_to(scan.root).as_posix(),
                             os.stat(record.path).st_size, record.label, record.patient,
                             record.example_id]))
  return digest.digest()


def check_same_data(scan, salt: bytes) -> None:
  """Refuses (ConfigError on every process) a job whose processes hold other data than
  process 0. `salt` must be the same on every process (the run's, broadcast from process 0).
  Collective: every process must call it."""
  if jax.process_count() == 1:
    return
  digest = data_digest(scan, salt)
  everyone = parallel.gather_from_all_processes(  # 128 of its bits are plenty.
      [int.from_bytes(digest[i:i + 4], 'little') for i in range(0, 16, 4)])
  others = [p for p, row in enumerate(everyone) if row != everyone[0]]
  if others:
    raise ConfigError(f'the data differ between the processes of this job: {_processes(others)} '
                      'found other files, sizes, labels or patients under --data_dir than process '
                      '0; give every process the same copy of the data')
