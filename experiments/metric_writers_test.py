"""Metric files of a run: what goes where (covered or not), read back by TensorBoard, no line
written twice across a resume."""

import json
import math

import pytest
from tensorboard.backend.event_processing import event_accumulator

from experiments import checkpoint
from experiments import demo_data
from experiments import metric_writers
from experiments import results as results_lib
from experiments import train
from experiments.configs import default as default_config

# Keys of `_Progress.end_epoch` records that results.json keeps out of the release.
NOT_COVERED = ('train_loss', 'train_accuracy', 'mean_batch_images', 'nonfinite_examples',
               'fraction_clipped', 'mean_grad_norm', 'mean_batch_units')


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
  events = event_accumulator.EventAccumulator(str(logdir), size_guidance={'scalars': 0})
  events.Reload()
  return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
          for tag in events.Tags()['scalars']}


def _record(epoch, step, **extra):
  return {'epoch': epoch, 'step': step, 'learning_rate': 0.1, 'train_loss': 0.7,
          'train_accuracy': 0.6, 'val_loss': 0.5, 'val_accuracy': 0.75,
          'val_balanced_accuracy': 0.7, 'val_roc_auc': float('nan'), 'mean_batch_images': 8.0,
          'nonfinite_examples': 0.0, 'epsilon': 0.5, 'fraction_clipped': 0.9,
          'mean_grad_norm': 3.0, 'mean_batch_units': 7.5, **extra}


def test_epochs_are_split_as_results_json_splits_them(tmp_path):
  writers = metric_writers.create_run_writers(tmp_path, 0)
  for epoch in (1, 2):
    writers.write_epoch(_record(epoch, 4 * epoch), seed_public=False)
  writers.close()
  covered = metric_writers.read_jsonl(tmp_path / 'metrics.jsonl')
  uncovered = metric_writers.read_jsonl(tmp_path / 'not_covered' / 'metrics.jsonl')
  released, not_released = results_lib.split_history([_record(1, 4)])
  assert [set(r) for r in covered] == [set(released[0])] * 2
  assert [set(r) for r in uncovered] == [set(not_released[0]) | {'step'}] * 2
  assert [r['step'] for r in covered] == [4, 8] and covered[0]['val_roc_auc'] == 'nan'
  assert not set(NOT_COVERED) & {k for r in covered for k in r}
  assert set(NOT_COVERED) <= set(uncovered[0])
  tensorboard = _scalars(tmp_path / 'tensorboard')
  assert tensorboard['val_loss'] == [(4, 0.5), (8, 0.5)]
  assert math.isnan(tensorboard['val_roc_auc'][0][1])  # Recorded, as NaN.
  assert not set(NOT_COVERED) & set(tensorboard)
  # No clock in covered events: an epoch's duration depends on the training data.
  events = event_accumulator.EventAccumulator(str(tmp_path / 'tensorboard'))
  events.Reload()
  assert [e.wall_time for e in events.Scalars('val_loss')] == [4.0, 8.0]
  train_loss = _scalars(tmp_path / 'not_covered' / 'tensorboard')['train_loss']
  assert train_loss == [(4, pytest.approx(0.7)), (8, pytest.approx(0.7))]  # float32 in events.
  assert (tmp_path / 'not_covered').stat().st_mode & 0o077 == 0
  assert (tmp_path / 'not_covered' / 'metrics.jsonl').stat().st_mode & 0o077 == 0


def test_a_public_noise_seed_never_writes_an_epsilon(tmp_path):
  writers = metric_writers.create_run_writers(tmp_path, 0)
  writers.write_epoch(_record(1, 4), seed_public=True)
  writers.close()
  (line,) = metric_writers.read_jsonl(tmp_path / 'metrics.jsonl')
  assert 'epsilon' not in line and line['epsilon_if_seed_secret'] == 0.5
  assert 'epsilon' not in _scalars(tmp_path / 'tensorboard')


def test_a_restart_drops_and_purges_the_steps_from_its_checkpoint_on(tmp_path):
  first = metric_writers.create_run_writers(tmp_path, 0)
  for step in (4, 8, 12):
    first.write_epoch(_record(step // 4, step), seed_public=False)
  first.flush()  # Killed: never closed.
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 16, "val_lo')  # A line cut short by the kill.
  second = metric_writers.create_run_writers(tmp_path, 8)  # Resumed from the checkpoint at 8.
  for step in (8, 12, 16):
    second.write_epoch(_record(step // 4, step, val_loss=0.25), seed_public=False)
  second.close()
  lines = metric_writers.read_jsonl(tmp_path / 'metrics.jsonl')
  assert [(r['step'], r['val_loss']) for r in lines] == [(4, 0.5), (8, 0.25), (12, 0.25),
                                                         (16, 0.25)]
  assert len((tmp_path / 'metrics.jsonl').read_text().splitlines()) == 4
  assert _scalars(tmp_path / 'tensorboard')['val_loss'] == [(4, 0.5), (8, 0.25), (12, 0.25),
                                                            (16, 0.25)]
  assert [r['step'] for r in metric_writers.read_jsonl(
      tmp_path / 'not_covered' / 'metrics.jsonl')] == [4, 8, 12, 16]


def test_switched_off_or_on_another_process_nothing_is_written(tmp_path, monkeypatch):
  writers = metric_writers.create_run_writers(tmp_path, 0, enabled=False)
  writers.write_epoch(_record(1, 4), seed_public=False)
  writers.close()
  monkeypatch.setattr(metric_writers.parallel, 'is_first_process', lambda: False)
  writers = metric_writers.create_run_writers(tmp_path, 0)
  writers.write_epoch(_record(1, 4), seed_public=False)
  writers.close()
  assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_a_resumable_disk_full(tmp_path, monkeypatch):
  import errno

  def no_space(*_):
    raise OSError(errno.ENOSPC, 'No space left on device')

  writers = metric_writers.create_run_writers(tmp_path, 0)
  monkeypatch.setattr(metric_writers.JsonlWriter, 'write_scalars', no_space)
  with pytest.raises(checkpoint.DiskFull):
    writers.write_epoch(_record(1, 4), seed_public=False)
  writers.close_quietly()


@pytest.fixture(scope='module')
def tiny_pneumonia(tmp_path_factory):
  folder = tmp_path_factory.mktemp('data') / 'pneumonia'
  demo_data.write_demo_data('pneumonia', folder, seed=0,
                            class_counts={'train': [16, 28], 'val': [2, 2], 'test': [6, 10]})
  return folder


def test_a_killed_and_resumed_run_writes_each_epoch_once(tiny_pneumonia, tmp_path, monkeypatch):
  """A tiny DP-SGD run killed at its last epoch's end, after the epoch's metrics were written but
  before its checkpoint: the resumed run (from the first epoch's checkpoint) writes the first
  epoch again from the checkpoint and the second once. One line per epoch and one of test
  metrics, and TensorBoard reads the same."""
  monkeypatch.setenv('DPJAX_CACHE', str(tmp_path / 'cache'))
  config = default_config.preset(demo_data=False)
  workdir = tmp_path / 'run'
  config.update(dataset='pneumonia', mech='dpsgd', data_dir=str(tiny_pneumonia), epochs=2,
                image_size=32, batch_size=8, microbatch_size=8, eval_batch_size=16, arch='tiny',
                weights='none', progress=False, checkpoint_every_steps=0, epsilon=4.0,
                workdir=str(workdir), cache_dir=str(tmp_path / 'cache'))
  real_save, saved = checkpoint.RunCheckpointer.save, []

  def save_then_die_at_the_second(self, step, *rest):
    if saved:
      raise KeyboardInterrupt
    real_save(self, step, *rest)
    saved.append(step)

  monkeypatch.setattr(checkpoint.RunCheckpointer, 'save', save_then_die_at_the_second)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config)
  interrupted = metric_writers.read_jsonl(workdir / 'metrics.jsonl')
  assert [r['step'] for r in interrupted] == [saved[0], 2 * saved[0]]  # Both epochs written.
  monkeypatch.setattr(checkpoint.RunCheckpointer, 'save', real_save)
  results = train.train_and_evaluate(config)

  covered = metric_writers.read_jsonl(workdir / 'metrics.jsonl')
  history = results['release']['history']
  assert len(covered) == len(history) + 1 == 3
  assert [r['step'] for r in covered] == [e['step'] for e in history] + [results['steps']]
  for line, epoch in zip(covered, history):  # The released history, number for number.
    assert line == pytest.approx(epoch) and 'epsilon' in line and 'val_roc_auc' in line
  final = covered[-1]
  assert final['test_balanced_accuracy'] == pytest.approx(
      results['release']['test_metrics']['balanced_accuracy'])
  assert final['best_epoch'] == results['release']['best_epoch']
  assert not any(k.startswith('test_') for line in covered[:-1] for k in line)
  assert not set(NOT_COVERED) & {k for line in covered for k in line}

  tensorboard = _scalars(workdir / 'tensorboard')
  assert [s for s, _ in tensorboard['val_loss']] == [e['step'] for e in history]
  assert [v for _, v in tensorboard['epsilon']] == pytest.approx([e['epsilon'] for e in history])
  assert [s for s, _ in tensorboard['test_roc_auc']] == [results['steps']]
  assert not set(NOT_COVERED) & set(tensorboard)

  uncovered = metric_writers.read_jsonl(workdir / 'not_covered' / 'metrics.jsonl')
  assert [r['step'] for r in uncovered] == [e['step'] for e in history] + [results['steps']]
  assert [r['train_loss'] for r in uncovered[:-1]] == pytest.approx(
      [e['train_loss'] for e in results['not_covered']['history']])
  assert uncovered[-1]['selected_train_accuracy'] == pytest.approx(
      results['not_covered']['train_accuracy'])
  not_covered_tb = _scalars(workdir / 'not_covered' / 'tensorboard')
  assert [s for s, _ in not_covered_tb['fraction_clipped']] == [e['step'] for e in history]
  assert json.loads((workdir / 'results.json').read_text())['steps'] == results['steps']
