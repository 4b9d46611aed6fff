"""A run's metrics as they come: JSONL and TensorBoard event files (CLU `metric_writers` shape).

Two sets of files, split by what covers them (`results.split_history`, the split of results.json):

- `<workdir>/metrics.jsonl` and `<workdir>/tensorboard/`: covered by the run's guarantee. Per
  epoch the validation metrics of the model being trained, the learning rate and the epsilon
  spent so far (`epsilon_if_seed_secret` with --noise_seed); once, at the final step, the test
  metrics of the selected model (`test_*`) and its epoch (`best_epoch`).
- `<workdir>/not_covered/metrics.jsonl` and `<workdir>/not_covered/tensorboard/`: the curator's,
  NOT covered by the guarantee. Per epoch the running training loss and accuracy and the clipping
  statistics (computed from training examples outside the mechanism); at the final step the
  selected model's training loss and accuracy.

`tensorboard --logdir <workdir>` shows both, as the runs `tensorboard` and
`not_covered/tensorboard`. Each JSONL line is one JSON object, `{"step": ..., "epoch": ...,
NAME: VALUE, ...}`; non-finite numbers are the strings "nan", "inf" and "-inf" (as in
results.json). Only process 0 writes.

A resumed run writes each step once: lines of the steps at or after the checkpoint it resumes
from are dropped from the JSONL (and purged in TensorBoard, which hides an interrupted attempt's
events from the restart step on), and the epoch ending at the checkpoint's step is written again
from the checkpoint. Event files are written with tensorboardX (no TensorFlow); the core `dpjax`
package never imports it.
"""

from __future__ import annotations

import abc
import contextlib
import importlib.util
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from experiments import checkpoint
from experiments import parallel
from experiments import results as results_lib

JSONL_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
NOT_COVERED_DIR = 'not_covered'  # The curator's: owner-only (0700).


class MetricWriter(abc.ABC):
  """What CLU's `metric_writers.MetricWriter` offers for scalars."""

  @abc.abstractmethod
  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Records `scalars` at training step `step`."""

  @abc.abstractmethod
  def flush(self) -> None:
    """Makes everything written so far durable."""

  def close(self) -> None:
    """Flushes and releases the writer's files."""
    self.flush()


class NoOpWriter(MetricWriter):
  """Writes nothing (processes other than 0, or --metric_writers=false)."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    del step, scalars

  def flush(self) -> None:
    pass


def _jsonable(value: float) -> float | int | str:
  value = value if isinstance(value, int) and not isinstance(value, bool) else float(value)
  if isinstance(value, float) and not math.isfinite(value):
    return 'nan' if math.isnan(value) else ('inf' if value > 0 else '-inf')
  return value


def read_jsonl(path: Path) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl; a line left unfinished by a kill is skipped."""
  try:
    text = Path(path).read_text()
  except FileNotFoundError:
    return []
  records = []
  for line in text.splitlines():
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and isinstance(record.get('step'), int):
      records.append(record)
  return records


class JsonlWriter(MetricWriter):
  """One JSON object per `write_scalars` call, one line each, appended to `path`.

  Lines of steps >= `start_step` already in the file (an interrupted attempt's, past the
  checkpoint this run resumes from; a fresh run has `start_step` 0) are dropped first.
  """

  def __init__(self, path: Path, start_step: int = 0, mode: int = 0o644):
    self.path = Path(path)
    if self.path.exists():
      kept = [r for r in read_jsonl(self.path) if r['step'] < start_step]
      tmp = self.path.with_name(self.path.name + '.tmp')
      tmp.unlink(missing_ok=True)
      with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), 'w') as out:
        out.write(''.join(json.dumps(r) + '\n' for r in kept))
      tmp.replace(self.path)
    self._file = open(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode), 'a')

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    record = {'step': int(step), **{k: _jsonable(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(record) + '\n')

  def flush(self) -> None:
    self._file.flush()
    os.fsync(self._file.fileno())

  def close(self) -> None:
    if not self._file.closed:
      self.flush()
      self._file.close()


class TensorBoardWriter(MetricWriter):
  """Scalars as TensorBoard event files under `logdir` (tensorboardX, no TensorFlow).

  Events of steps >= `start_step` from earlier attempts are purged (a SessionLog.START at
  `start_step`, which TensorBoard's readers honour).
  """

  def __init__(self, logdir: Path, start_step: int = 0, wall_times: bool = True):
    # Without `wall_times` every event is stamped with its step instead of the clock: how long
    # an epoch took depends on the training data (Poisson batch sizes), so covered files omit it.
    self._wall_times = wall_times
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    # A NaN (a validation ROC AUC of one class) is recorded as such; no console line for each.
    logging.getLogger('tensorboardX.x2num').setLevel(logging.ERROR)
    # tensorboardX names files by the second and the host: a resume within the same second
    # would overwrite the earlier attempt's file. Nanoseconds keep the names apart and in order.
    self._writer = SummaryWriter(str(logdir), purge_step=int(start_step), flush_secs=30,
                                 filename_suffix=f'.{time.time_ns()}.{os.getpid()}')

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    for name, value in scalars.items():
      self._writer.add_scalar(name, float(value), global_step=int(step),
                              walltime=None if self._wall_times else float(step))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class MultiWriter(MetricWriter):
  """Writes to each of `writers`."""

  def __init__(self, writers: list[MetricWriter]):
    self._writers = list(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    for writer in self._writers:
      writer.write_scalars(step, scalars)

  def flush(self) -> None:
    for writer in self._writers:
      writer.flush()

  def close(self) -> None:
    for writer in self._writers:
      writer.close()


def check_available(enabled: bool) -> None:
  """Raises (before anything is written) if the writers are wanted but tensorboardX is missing."""
  if enabled and importlib.util.find_spec('tensorboardX') is None:
    from experiments.config_checks import ConfigError  # pylint: disable=import-outside-toplevel
    raise ConfigError("--metric_writers needs tensorboardX: pip install -e '.[experiments]' (or "
                      'pip install tensorboardX), or pass --metric_writers=false')


def _numbers(record: Mapping[str, Any], drop=('step',)) -> dict[str, float]:
  """The numeric fields of `record` but `drop` (bools and lists are not scalars)."""
  return {k: v for k, v in record.items()
          if k not in drop and isinstance(v, (int, float)) and not isinstance(v, bool)}


class RunWriters:
  """The covered and the not-covered writers of one run; a full disk raises
  `checkpoint.DiskFull` naming `workdir` (the run resumes once there is room)."""

  def __init__(self, covered: MetricWriter, not_covered: MetricWriter,
               workdir: Path | None = None):
    self.covered, self.not_covered = covered, not_covered
    self.workdir = workdir

  def _disk_full_names(self):
    return checkpoint.disk_full_names(self.workdir or '.', 'writing the metrics')

  def write_epoch(self, record: Mapping[str, Any], seed_public: bool) -> None:
    """One `_Progress.epochs` record, split as results.json's history is."""
    (released,), (uncovered,) = results_lib.split_history([dict(record)], seed_public=seed_public)
    step = int(record['step'])
    with self._disk_full_names():
      self.covered.write_scalars(step, _numbers(released))
      self.not_covered.write_scalars(step, _numbers(uncovered))

  def write_final(self, step: int, release: Mapping[str, Any],
                  not_covered: Mapping[str, Any]) -> None:
    """The selected model's test metrics (covered) and training ones (not), once at `step`."""
    covered = {'best_epoch': release['best_epoch'],
               **{f'test_{k}': v for k, v in _numbers(release['test_metrics']).items()}}
    point = release.get('operating_point')
    if point:  # Two classes: at the threshold chosen on validation.
      covered.update({f'test_at_threshold_{k}': v for k, v in _numbers(point['test']).items()})
    with self._disk_full_names():
      self.covered.write_scalars(step, covered)
      self.not_covered.write_scalars(step, {
          'selected_train_loss': not_covered['train_loss'],
          'selected_train_accuracy': not_covered['train_accuracy']})

  def flush(self) -> None:
    with self._disk_full_names():
      self.covered.flush()
      self.not_covered.flush()

  def close(self) -> None:
    with self._disk_full_names():
      self.covered.close()
      self.not_covered.close()

  def close_quietly(self) -> None:
    """Closes on the way out of a failed run: an error here must not hide the run's own."""
    for writer in (self.covered, self.not_covered):
      with contextlib.suppress(Exception):
        writer.close()


def create_run_writers(workdir: Path, start_step: int, enabled: bool = True) -> RunWriters:
  """The writers of a run in `workdir` that starts (or resumes) at `start_step`; no-ops on
  processes other than 0 and when not `enabled`."""
  if not (enabled and parallel.is_first_process()):
    return RunWriters(NoOpWriter(), NoOpWriter())
  workdir = Path(workdir)
  private = workdir / NOT_COVERED_DIR

  def writers(folder: Path, mode: int, covered: bool) -> MetricWriter:
    return MultiWriter([JsonlWriter(folder / JSONL_FILE, start_step, mode=mode),
                        TensorBoardWriter(folder / TENSORBOARD_DIR, start_step,
                                          wall_times=not covered)])

  with checkpoint.disk_full_names(workdir, 'writing the metrics'):
    private.mkdir(mode=0o700, exist_ok=True)
    os.chmod(private, 0o700)
    return RunWriters(writers(workdir, 0o644, covered=True),
                      writers(private, 0o600, covered=False), workdir)
