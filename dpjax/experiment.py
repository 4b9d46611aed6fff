"""One experiment end to end: data, model, private training, selection, results.json.

`train_and_evaluate(config)` checks every input before it writes anything, so a bad flag or
data folder leaves the workdir untouched.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from dpjax import accounting
from dpjax import checkpoint
from dpjax import ldp
from dpjax import metrics as metrics_lib
from dpjax import models
from dpjax import parallel
from dpjax import reporting
from dpjax import run_audit
from dpjax import sampling
from dpjax import secret_keys
from dpjax import train
from dpjax import weights as weights_lib
from dpjax.data import datasets
from dpjax.data import demo
from dpjax.errors import ConfigError

DEMO_NOTE = 'SYNTHETIC DEMO DATA: these numbers say nothing about real medical images.'


def default_workdir(config) -> Path:
  return Path('runs') / f'{config.dataset}_{config.mech}_beta{config.beta:g}_seed{config.seed}'


_SUM_KEYS = ('loss_sum', 'correct', 'count', 'units', 'num_clipped', 'sum_norms', 'steps')

NOT_COVERED_NOTE = ('Statistics computed from training examples outside the mechanism. They are '
                    'NOT covered by the privacy guarantee: do not publish them as private.')
RELEASE_NOTE = ('What the guarantee covers: the model (every parameter update of training) '
                'and what is computed from it and from validation/test data alone. '
                'Validation and test examples themselves are not protected.')
# Per-epoch fields of the history, by what they are computed from.
_RELEASED_HISTORY = ('epoch', 'step', 'learning_rate', 'val_loss', 'val_accuracy', 'epsilon')


def _fingerprint(config) -> dict[str, Any]:
  """The config fields that determine the result (not where it goes or how it is shown)."""
  fields = config if isinstance(config, dict) else config.to_dict()
  return {k: v for k, v in fields.items() if k not in ('workdir', 'progress')}


@dataclasses.dataclass
class _Progress:
  """Everything the loop accumulates besides the TrainState; checkpointed with it."""
  best_params: Any
  epochs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  sums: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(_SUM_KEYS, 0.0))
  best_val_loss: float = float('inf')
  best_epoch: int = -1
  epsilon: float = 0.0
  plateau: train.Plateau = dataclasses.field(default_factory=train.Plateau)

  def add(self, step_metrics) -> None:
    for k, v in step_metrics.items():
      self.sums[k] += float(v)
    self.sums['steps'] += 1

  def postfix(self, private: bool) -> dict[str, str]:
    # Starred: running training statistics, not covered by the guarantee (the header says so).
    count = self.sums['count']
    if count:
      shown = {'loss*': f'{self.sums["loss_sum"] / count:.3f}',
               'acc*': f'{self.sums["correct"] / count:.3f}'}
    else:  # Between epochs: the last epoch's training numbers.
      last = self.epochs[-1] if self.epochs else {'train_loss': float('nan'), 'train_accuracy': float('nan')}
      shown = {'loss*': f'{last["train_loss"]:.3f}', 'acc*': f'{last["train_accuracy"]:.3f}'}
    if self.epochs:
      shown['val_acc'] = f'{self.epochs[-1]["val_accuracy"]:.3f}'
    shown['eps'] = f'{self.epsilon:.3g}' if private else '-'
    return shown

  def end_epoch(self, epoch, step, val, private, get_params, learning_rate) -> None:
    count = max(self.sums['count'], 1.0)
    steps = max(self.sums['steps'], 1.0)
    record = {'epoch': epoch, 'step': step, 'learning_rate': learning_rate,
              'train_loss': self.sums['loss_sum'] / count,
              'train_accuracy': self.sums['correct'] / count, 'val_loss': val['loss'],
              'val_accuracy': val['accuracy'], 'mean_batch_images': self.sums['count'] / steps}
    if private:
      units = max(self.sums['units'], 1.0)
      record.update(epsilon=self.epsilon, fraction_clipped=self.sums['num_clipped'] / units,
                    mean_grad_norm=self.sums['sum_norms'] / units,
                    mean_batch_units=self.sums['units'] / steps)
    self.epochs.append(record)
    if val['loss'] < self.best_val_loss:  # Selection on validation loss, as the paper; never test.
      self.best_val_loss, self.best_epoch = val['loss'], epoch
      self.best_params = get_params()
    self.sums = dict.fromkeys(_SUM_KEYS, 0.0)

  def to_meta(self) -> dict[str, Any]:
    return {'epochs': self.epochs, 'sums': self.sums, 'best_val_loss': self.best_val_loss,
            'best_epoch': self.best_epoch, 'epsilon': self.epsilon,
            'plateau': dataclasses.asdict(self.plateau)}

  @classmethod
  def from_meta(cls, meta, best_params) -> _Progress:
    return cls(best_params=best_params, epochs=meta['epochs'], sums=meta['sums'],
               best_val_loss=float(meta['best_val_loss']), best_epoch=meta['best_epoch'],
               epsilon=meta['epsilon'], plateau=train.Plateau(**meta['plateau']))


def differing_flags(saved: dict[str, Any], current: dict[str, Any]) -> str:
  """'--momentum: 0.0 -> 0.9, ...' for the fields two config fingerprints disagree on."""
  names = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
  shown = [f'--{k}: {saved.get(k)!r} -> {current.get(k)!r}' for k in names[:6]]
  return ', '.join(shown + ([f'and {len(names) - 6} more'] if len(names) > 6 else []))


def _check_same_run(workdir: Path, what: str, saved_config: dict[str, Any], config,
                    saved_data: str | None, data_fingerprint: str) -> None:
  """Refuses (one line) a workdir whose run had other settings or other data."""
  if _fingerprint(saved_config) != _fingerprint(config):
    raise ConfigError(f'--workdir={workdir} holds {what} with other settings '
                      f'({differing_flags(_fingerprint(saved_config), _fingerprint(config))}); '
                      'use a new --workdir')
  if saved_data != data_fingerprint:
    raise ConfigError(f'--workdir={workdir} holds {what} computed on other data: the files under '
                      f'{config.data_dir or "the demo data"} changed since (fingerprint '
                      f'{(saved_data or "none")[:12]} -> {data_fingerprint[:12]}); use a new '
                      '--workdir, or restore the data')


def _finished_results(workdir: Path, config, data_fingerprint: str) -> dict[str, Any] | None:
  """The results of a finished run of the same config on the same data, so it is not redone.

  results.json of other settings or other data is refused, never silently returned.
  """
  try:
    results = json.loads((workdir / 'results.json').read_text())
  except (OSError, ValueError):
    return None
  _check_same_run(workdir, 'finished results', results.get('config', {}), config,
                  results.get('data_fingerprint'), data_fingerprint)
  return {**results, 'workdir': str(workdir), 'reused': True}


def _intact_checkpoints(workdir: Path, config, data_fingerprint: str) -> list[tuple[int, dict, dict]]:
  """(step, meta, secret) of the checkpoints whose metadata read back, newest first.

  A damaged one is reported in one line and skipped; checkpoints of other settings or data
  are refused. Reads only: nothing is created where there are no checkpoints.
  """
  if not (workdir / 'checkpoints').is_dir():
    return []
  ckpt = checkpoint.RunCheckpointer(workdir)
  try:
    steps, intact, damaged = ckpt.steps(), [], []
    for step in steps:
      try:
        meta, secret = ckpt.read_json(step)
      except checkpoint.CheckpointDamaged as e:
        damaged.append(str(e))
        continue
      _check_same_run(workdir, 'a run', meta.get('config', {}), config,
                      meta.get('data_fingerprint'), data_fingerprint)
      intact.append((step, meta, secret))
  finally:
    ckpt.close()
  if steps and not intact:
    raise ConfigError(f'no intact checkpoint in {workdir / "checkpoints"} ({len(damaged)} damaged): '
                      'delete that folder to start the run over')
  for message in damaged:
    tqdm.write(f'warning: {message}; resuming from an older one', file=sys.stderr)
  return intact


def _round_up(value: int, multiple_of: int) -> int:
  return -(-value // multiple_of) * multiple_of


def _make_sampler(config, plan: train.PrivacyPlan, train_split, mesh, key: jax.Array):
  """The batch sampler; `key` is the run's secret sampling stream."""
  num_train = len(train_split)
  if config.mech == 'dpsgd' and config.sampling == 'poisson':
    # Fixed-shape padded batches that split into clipping chunks and across the devices; the
    # multiple is in units (a patient's image slots never straddle a chunk or a device).
    rows = plan.rows_per_unit
    multiple = parallel.batch_multiple(mesh, (config.microbatch_size or rows) // rows)
    if plan.privacy_unit == 'patient':
      return sampling.PoissonSampler(key, num_train, plan.sampling_prob, multiple_of=multiple,
                                     units=train_split.units(), max_unit_size=rows)
    return sampling.PoissonSampler(key, num_train, plan.sampling_prob, multiple_of=multiple)
  if config.batch_size % parallel.num_shards(mesh):
    raise ConfigError(f'--batch_size={config.batch_size} must be a multiple of the '
                      f'{parallel.num_shards(mesh)} devices')
  # Fixed-size shuffled batches; DP-SGD accounts them with the matching (shuffled) event.
  return sampling.ShuffledSampler(key, num_train, config.batch_size, drop_last=True)


def _pretrained_available(spec: str) -> bool:
  if spec == 'none':
    return False
  if spec == 'imagenet':
    return weights_lib.find_imagenet_checkpoint() is not None
  if not Path(spec).exists():
    raise ConfigError(f'--weights={spec}: no such file or folder')
  return True


def private_randomness_summary(config) -> dict[str, Any]:
  """Where the noise and sampling came from, and what that means for the guarantee."""
  if config.noise_seed < 0:
    return {'source': 'os_entropy', 'generator': f'JAX {secret_keys.KEY_IMPL}, 64-bit key',
            'note': 'drawn from OS entropy for this run; kept only in its (private) checkpoints'}
  return {'source': 'noise_seed', 'generator': f'JAX {secret_keys.KEY_IMPL}, 64-bit key',
          'note': (f'reproducible from --noise_seed={config.noise_seed}: NO guarantee against '
                   'anyone who knows it')}


def _seed_warning(config) -> str:
  return (f'NO guarantee against anyone who knows --noise_seed={config.noise_seed} (the noise '
          'and sampling can be regenerated); otherwise: ') if config.noise_seed >= 0 else ''


def privacy_summary(config, plan: train.PrivacyPlan, ledger, data) -> dict[str, Any]:
  """The guarantee of what actually ran, with its delta, neighbouring relation and unit."""
  unit = plan.privacy_unit
  base = {'privacy_unit': unit, 'private_randomness': private_randomness_summary(config)}
  if config.mech == 'none':
    return {**base, 'privacy_unit': None, 'epsilon': None, 'delta': None,
            'guarantee': 'none (non-private baseline)'}
  if config.mech == 'ldp':
    grayscale = config.ldp_variant == 'laplace' and config.dataset in train.GRAYSCALE_DATASETS
    report = ldp.ldp_epsilon_report(config.beta, (data.prep_size, data.prep_size, 3),
                                    variant=config.ldp_variant, grayscale=grayscale)
    per_image = report['per_image_epsilon']  # None: no image-level guarantee at all.
    guarantee = ldp.format_ldp_epsilon(report)
    if data.train.patients is not None and per_image is not None:
      report['per_patient_epsilon'] = f'k * {per_image:g} for a patient with k images'
      guarantee += f'; k * {per_image:g} per patient with k images'
    return {**base, 'epsilon': float('inf') if per_image is None else per_image, 'delta': 0.0,
            'neighbouring_relation': report['per_image_relation'],
            'guarantee': _seed_warning(config) + guarantee, 'ldp': report}
  eps = ledger.epsilons(config.delta)
  who = ("each patient's images (neighbouring data sets add or remove one patient with all "
         'their images)' if unit == 'patient' else
         f'each training image ({ledger.neighbouring_relation})')
  if unit == 'patient' and data.patients['unparsed_file_names']:
    who += (f" (patients as identified by file names; {data.patients['unparsed_file_names']} "
            'unnamed files count as their own patients)')
  if unit == 'image' and data.train.patients is not None:
    who += '; a patient with k images gets only the k-fold weaker group guarantee'
  summary = {**base,
      'epsilon': eps[config.accountant], 'epsilon_pld': eps['pld'], 'epsilon_rdp': eps['rdp'],
      'delta': config.delta, 'accountant': config.accountant,
      'neighbouring_relation': ledger.neighbouring_relation,
      'noise_multiplier': plan.noise_multiplier,
      'accounted_noise_multiplier': plan.accounted_noise_multiplier,
      'sampling_prob': plan.sampling_prob, 'sampling': config.sampling, 'steps': ledger.num_steps,
      'clip_group_size': config.clip_group_size, 'target_epsilon': plan.target_epsilon,
      'l2_norm_clip': config.l2_norm_clip, 'privacy_units_in_train': plan.num_units,
      'guarantee': (f'{_seed_warning(config)}({eps[config.accountant]:.3g}, {config.delta:g})-DP '
                    f'for {who}, {config.accountant.upper()} accountant; covers the model, not '
                    'the not_covered statistics; validation and test examples are not protected')}
  if config.protocol == 'paper':
    # What the paper would have printed: Poisson sampling and per-example sensitivity assumed.
    claimed = accounting.PrivacyLedger(sampling='poisson')
    claimed.record_steps(plan.noise_multiplier, plan.sampling_prob, ledger.num_steps)
    summary['epsilon_claimed_by_paper_method'] = claimed.epsilon(config.delta, 'rdp')
  if config.norm == 'batch_norm':
    summary.update(
        epsilon=float('inf'), epsilon_if_batchnorm_were_frozen=summary['epsilon'],
        guarantee=('NO DP guarantee: BatchNorm in training mode mixes examples within a batch '
                   'and updates running statistics without noise'))
  return summary


def resolve_private_key(config, workdir: Path) -> tuple[jax.Array, dict[str, Any]]:
  """The run's secret root key: its checkpoint's (resume), --noise_seed's, or fresh entropy.

  Returns (key, the `secret` checkpoint item). Nothing here is ever written to results or logs.
  """
  secret = None
  if (workdir / 'checkpoints').is_dir():
    ckpt = checkpoint.RunCheckpointer(workdir)
    try:
      for step in ckpt.steps():  # The newest readable one; every checkpoint of a run has it.
        try:
          secret = ckpt.restore_secret(step)
          break
        except checkpoint.CheckpointDamaged:
          continue
    finally:
      ckpt.close()
  if secret is None:
    if config.noise_seed >= 0:
      # The run's identity is hashed in: other runs with the same seed get unrelated noise.
      identity = json.dumps(_fingerprint(config), sort_keys=True)
      key = secret_keys.reproducible_secret_key(config.noise_seed, identity)
    else:
      key = secret_keys.fresh_secret_key()
    secret = {'private_key': secret_keys.key_to_data(key),
              'source': 'noise_seed' if config.noise_seed >= 0 else 'os_entropy'}
  # Every process must use process 0's key: they compute the same global batch indices and
  # add one noise draw; independent draws would stitch batches from different samples.
  secret['private_key'] = parallel.broadcast_from_first_process(secret['private_key'])
  return secret_keys.key_from_data(secret['private_key']), secret


@dataclasses.dataclass
class Run:
  """Everything one training run is made of, built before its first step."""
  plan: train.PrivacyPlan
  norm: str
  model: Any
  state: train.TrainState
  train_step: Any
  eval_step: Any
  sampler: Any
  pretrained: bool
  weights_note: str
  clipping_method: str | None = None  # DP-SGD only: 'ghost' or 'vmap', as the step runs.
  canaries: run_audit.GradientCanaries | None = None
  ldp_key: jax.Array | None = None  # The secret key of the LDP release (for its audit).


def build_run(config, data, mesh, private_key: jax.Array) -> Run:
  """Model, weights, optimizer, jitted steps and sampler of `config` on `data` over `mesh`.

  `private_key` is the run's secret root key (`resolve_private_key`); every stream the
  guarantee depends on derives from it, the public ones from --seed.
  """
  unparsed = data.patients['unparsed_file_names'] if data.patients else 0
  unit = train.resolve_privacy_unit(config, data.train.patients is not None, unparsed)
  num_units = len(data.train.units()) if unit == 'patient' else len(data.train)
  plan = train.plan_privacy(config, num_units, unit)  # Also checks the batch fits the data.
  norm = train.resolve_norm(config.norm, config.mech, _pretrained_available(config.weights))
  model = models.create_model(data.num_classes, norm, arch=config.arch)
  input_shape = (1, config.image_size, config.image_size, 3)
  variables, pretrained, weights_note = weights_lib.load_pretrained(
      config.weights, model, data.num_classes, train.stream_key(config.seed, train._INIT), input_shape)
  sampler = _make_sampler(config, plan, data.train, mesh,
                          train.private_stream(private_key, train.SAMPLING))
  tx = train.make_optimizer(config, plan, train.private_stream(private_key, train.NOISE))
  state = parallel.replicate(
      train.create_train_state(variables, tx, config.seed, private_key), mesh)
  canaries = None
  if config.audit and plan.mech == 'dpsgd':
    canaries = run_audit.make_gradient_canaries(
        train.private_stream(private_key, train.CANARY), variables['params'],
        config.audit_canaries)
  clipping_method = train.resolve_clipping_method(config, norm) if plan.mech == 'dpsgd' else None
  return Run(plan=plan, norm=norm, model=model, state=state, canaries=canaries,
             clipping_method=clipping_method,
             train_step=train.make_train_step(model, tx, config, plan, norm, mesh, canaries),
             eval_step=train.make_eval_step(model, config, mesh), sampler=sampler,
             pretrained=pretrained, weights_note=weights_note,
             ldp_key=train.private_stream(private_key, train.LDP))


def _split_history(epochs: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
  """Per-epoch records -> (released part, not-covered part), both keyed by epoch."""
  released = [{k: e[k] for k in _RELEASED_HISTORY if k in e} for e in epochs]
  uncovered = [{'epoch': e['epoch'], **{k: v for k, v in e.items() if k not in _RELEASED_HISTORY}}
               for e in epochs]
  return released, uncovered


def _export_model(workdir: Path, params, batch_stats) -> str:
  """Writes the selected model (no optimizer state, no keys) as the public artifact."""
  from flax import serialization  # Deferred: only needed at the very end.
  path = workdir / 'release' / 'model.msgpack'
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.tmp')
  tmp.write_bytes(serialization.msgpack_serialize(
      jax.tree.map(np.asarray, {'params': params, 'batch_stats': batch_stats})))
  tmp.replace(path)
  return str(path.relative_to(workdir))


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


def _restore_newest_intact(ckpt, intact, state, best_params):
  """(state, best, meta) of the newest checkpoint whose arrays read back intact."""
  damaged = []
  for step, _, _ in intact:
    try:
      restored = ckpt.restore(step, state, best_params)
    except checkpoint.CheckpointDamaged as e:
      damaged.append(str(e))
      continue
    for message in damaged:
      tqdm.write(f'warning: {message}; resuming from an older one', file=sys.stderr)
    return restored
  raise ConfigError(f'no intact checkpoint in {ckpt.directory} ({len(damaged)} damaged): delete '
                    'that folder to start the run over')


def train_and_evaluate(config, workdir: str | Path | None = None) -> dict[str, Any]:
  """Runs one experiment and writes `<workdir>/results.json`; returns the results."""
  train.validate_config(config)
  workdir = Path(workdir or config.workdir or default_workdir(config))
  check_writable_dir(workdir, '--workdir')
  check_writable_dir(Path(config.cache_dir).expanduser() if config.cache_dir
                     else demo.default_cache_root(), '--cache_dir')
  if config.distributed:
    parallel.initialize_distributed()
  lock = WorkdirLock(workdir)
  if workdir.is_dir():
    lock.acquire()  # Before reading what the folder holds.
  try:
    return _train_and_evaluate(config, workdir, lock)
  finally:
    lock.release()


def _train_and_evaluate(config, workdir: Path, lock: WorkdirLock) -> dict[str, Any]:
  start = time.time()
  # Cheap checks first: the data's fingerprint (a listing, no decoding) against what this
  # workdir already holds, before any preparation, compilation or training.
  scan = datasets.scan_dataset(config.dataset, config.data_dir or None, skip_bad=config.skip_bad,
                               cache_dir=config.cache_dir or None)
  data_fingerprint = scan.content_fingerprint()
  finished = _finished_results(workdir, config, data_fingerprint)
  if finished is not None:
    return finished
  intact = _intact_checkpoints(workdir, config, data_fingerprint)
  by_patient = train.resolve_privacy_unit(
      config, scan.dataset == 'pneumonia', scan.unparsed_patient_names) == 'patient'
  train.check_target_is_private(config, datasets.expected_train_units(scan, by_patient))
  data = datasets.load_dataset(config.dataset, config.data_dir or None, config.image_size,
                               seed=config.seed, skip_bad=config.skip_bad,
                               cache_dir=config.cache_dir or None, scan=scan)
  mesh = parallel.make_mesh()
  private_key, secret = resolve_private_key(config, workdir)
  run = build_run(config, data, mesh, private_key)  # Checks everything that can still fail on input.
  workdir.mkdir(parents=True, exist_ok=True)
  lock.acquire()  # A new folder: locked as soon as it exists.
  num_train, plan, norm, state = len(data.train), run.plan, run.norm, run.state
  train_step, eval_step, sampler = run.train_step, run.eval_step, run.sampler
  eval_batch_size = _round_up(config.eval_batch_size, parallel.num_shards(mesh))
  ledger = None
  if plan.mech == 'dpsgd':
    ledger = accounting.PrivacyLedger(sampling=config.sampling,
                                      steps_per_epoch=train.shuffled_steps_per_epoch(config, plan.num_units))

  spe = train.steps_per_epoch(config, plan.num_units)
  total_steps = config.epochs * spe
  label = f'{config.dataset} {config.mech}' + (' [demo data]' if data.is_demo else '')
  patients = (f' ({len(data.train.units())} / {len(data.val.units())} / {len(data.test.units())} '
              'patients)') if data.train.patients is not None else ''
  header = [f'dpjax: {label}, {num_train} train / {len(data.val)} val / {len(data.test)} test'
            f' images{patients}',
            f'model: {config.arch} norm={norm}; {run.weights_note}']
  if plan.mech == 'dpsgd':
    units = 'patients' if plan.privacy_unit == 'patient' else 'images'
    header.append(f'DP-SGD: privacy unit {plan.privacy_unit}, z={plan.noise_multiplier:.4g}, '
                  f'q={plan.sampling_prob:.4g} ({config.batch_size} {units} per batch expected), '
                  f'{total_steps} steps, C={config.l2_norm_clip}, {config.sampling} sampling, '
                  f'{run.clipping_method} clipping; '
                  f'eps shown = {config.accountant.upper()} epsilon spent so far at '
                  f'delta={config.delta:g}, {ledger.neighbouring_relation} {plan.privacy_unit}')
  if config.noise_seed >= 0:
    header.append(f'WARNING: --noise_seed={config.noise_seed} makes the noise reproducible: '
                  'no guarantee against anyone who knows it')
  header.append('loss*/acc*: running training statistics, NOT covered by the privacy guarantee')
  if data.is_demo:
    header.append(DEMO_NOTE)
  if config.progress:
    for line in header:
      tqdm.write(line)

  progress = _Progress(best_params=jax.device_get((state.params, state.batch_stats)),
                       plateau=train.Plateau(patience=config.plateau_patience))
  ckpt = checkpoint.RunCheckpointer(workdir)
  fingerprint = _fingerprint(config)
  if intact:
    state, best, meta = _restore_newest_intact(ckpt, intact, state, progress.best_params)
    progress = _Progress.from_meta(meta, best)
    if ledger is not None:
      ledger = accounting.PrivacyLedger.from_dict(meta['ledger'])
      planned = (plan.accounted_noise_multiplier, plan.sampling_prob)
      if any((run_.noise_multiplier, run_.sampling_prob) != planned for run_ in ledger.runs):
        # Never mix: the resumed steps must be charged exactly like the recorded ones.
        raise ConfigError(f'the checkpoint in {ckpt.directory} recorded steps with another noise '
                          'or sampling rate than this run plans; use a new --workdir')
    tqdm.write(f'resumed from step {int(state.step)} ({ckpt.directory})', file=sys.stderr)

  def save_checkpoint():
    meta = {**progress.to_meta(), 'config': fingerprint, 'data_fingerprint': data_fingerprint,
            'ledger': ledger.to_dict() if ledger is not None else None}
    ckpt.save(int(state.step), state, progress.best_params, meta, secret)

  bar = tqdm(total=total_steps, initial=int(state.step), desc=label, disable=not config.progress,
             unit='step', dynamic_ncols=True)
  while int(state.step) < total_steps:
    step = int(state.step)
    indices, mask = sampler.sample(step)
    state, step_metrics = train_step(state, train.load_batch(data.train, indices, mask, mesh))
    step_metrics = jax.device_get(step_metrics)
    train.check_finite(step_metrics, step)
    progress.add(step_metrics)
    if ledger is not None:
      ledger.record_step(plan.accounted_noise_multiplier, plan.sampling_prob)
    bar.update(1)
    bar.set_postfix(progress.postfix(ledger is not None), refresh=False)
    if (step + 1) % spe == 0:  # End of an epoch: epsilon so far, validation, selection.
      if ledger is not None:
        progress.epsilon = ledger.epsilon(config.delta, config.accountant)
      val = train.summarize(train.evaluate(eval_step, state.params, state.batch_stats, data.val,
                                           eval_batch_size, mesh))
      progress.end_epoch((step + 1) // spe, step + 1, val, ledger is not None,
                         lambda: jax.device_get((state.params, state.batch_stats)),
                         train.learning_rate(state.opt_state))
      if config.lr_schedule == 'plateau' and progress.plateau.should_reduce(val['loss']):
        lowered = train.learning_rate(state.opt_state) * progress.plateau.factor
        state = state.replace(opt_state=train.set_learning_rate(state.opt_state, lowered))
      bar.set_postfix(progress.postfix(ledger is not None))
      save_checkpoint()
    elif config.checkpoint_every_steps and (step + 1) % config.checkpoint_every_steps == 0:
      save_checkpoint()
  bar.close()
  ckpt.close()

  best_params, best_batch_stats = progress.best_params
  final = {name: train.evaluate(eval_step, best_params, best_batch_stats, split,
                                eval_batch_size, mesh)
           for name, split in (('train', data.train), ('val', data.val), ('test', data.test))}
  test_labels = final['test']['labels']
  privacy = privacy_summary(config, plan, ledger, data)
  released_history, uncovered_history = _split_history(progress.epochs)
  release = {
      'covered_by': privacy['guarantee'],
      'note': RELEASE_NOTE,
      'model_file': None,
      'best_epoch': progress.best_epoch,
      'selection': 'lowest validation loss (test never used for selection)',
      'val_accuracy': train.summarize(final['val'])['accuracy'],
      'test_accuracy': train.summarize(final['test'])['accuracy'],
      'majority_baseline': float(np.bincount(test_labels, minlength=data.num_classes).max()
                                 / len(test_labels)),
      'test_metrics': metrics_lib.classification_report(final['test']['probs'], test_labels),
      'accuracy_note': ('accuracies of the selected model in eval mode on unperturbed images; '
                        'LDP noise and augmentation apply only to what training sees'),
      'history': released_history,
  }
  not_covered = {
      'note': NOT_COVERED_NOTE,
      'train_accuracy': train.summarize(final['train'])['accuracy'],
      'train_loss': train.summarize(final['train'])['loss'],
      'history': uncovered_history,
      'data': {'patients': data.patients, 'skipped_files': list(data.skipped)},
  }
  results = {
      'dataset': config.dataset, 'mech': config.mech, 'beta': config.beta,
      **privacy,
      'release': release,
      'not_covered': not_covered,
      'epochs': config.epochs, 'steps': int(state.step),
      'data': 'demo' if data.is_demo else str(data.source),
      'data_note': DEMO_NOTE if data.is_demo else None,
      'data_fingerprint': data_fingerprint,
      # Sizes are treated as public, as by every DP-SGD accountant (q = batch / n).
      'split_sizes': {'train': num_train, 'val': len(data.val), 'test': len(data.test)},
      'model': {'arch': config.arch, 'norm': norm, 'pretrained': run.pretrained,
                'weights': run.weights_note},
      'pretrained': run.pretrained,
      'config': config.to_dict(),
      **reporting.provenance(),
  }
  if data.train.patients is not None:
    results['split_patients'] = {'train': len(data.train.units()), 'val': len(data.val.units()),
                                 'test': len(data.test.units())}
  if plan.mech == 'dpsgd':
    results['privacy_ledger'] = ledger.to_dict()
    results['clipping_method'] = run.clipping_method
  if config.audit:
    # Membership scores are losses of training examples: not covered. The canary audit scores
    # the released parameters at the canaries' coordinates: a function of the model.
    not_covered['audit'] = {'membership': run_audit.membership_audit(final, config.delta, config.seed)}
    if run.canaries is not None:
      release['audit'] = {'canaries': run_audit.canary_audit(
          run.canaries, best_params, config.delta, max(1, config.audit_canaries // 10))}
    if config.mech == 'ldp':
      not_covered['audit']['reconstruction'] = run_audit.reconstruction_audit(
          data, train.make_ldp_fn(config), run.ldp_key,
          grayscale=config.dataset in train.GRAYSCALE_DATASETS, beta=config.beta)
  if jax.process_index() == 0:
    release['model_file'] = _export_model(workdir, best_params, best_batch_stats)
    results['wall_time_s'] = round(time.time() - start, 1)
    reporting.write_json_atomic(workdir / 'results.json', results)
    reporting.write_json_atomic(workdir / 'release' / 'release.json', public_release(results))
    # A finished run is reused through results.json alone: its checkpoints, which hold the
    # secret key (enough to subtract the noise from the released model), go.
    shutil.rmtree(ckpt.directory, ignore_errors=True)
  results['workdir'] = str(workdir)
  return results


def public_release(results: dict[str, Any]) -> dict[str, Any]:
  """What may be published beside the model: results without the `not_covered` part."""
  return {k: v for k, v in results.items() if k != 'not_covered'}


def summary_lines(results: dict[str, Any]) -> list[str]:
  """The final human-readable summary of a run."""
  release, uncovered = results['release'], results['not_covered']
  lines = []
  if results.get('reused'):
    lines.append(f'reused the finished run in {results["workdir"]} (same settings and data); '
                 'delete its results.json to recompute')
  lines += [f'{results["dataset"]} / {results["mech"]} (beta={results["beta"]:g}): '
           f'val {release["val_accuracy"]:.4f}  test {release["test_accuracy"]:.4f}  '
           f'(majority baseline {release["majority_baseline"]:.4f})',
           f'train {uncovered["train_accuracy"]:.4f} (not covered: a statistic of the training '
           'data outside the mechanism)',
           f'privacy: {results["guarantee"]}',
           f'privacy unit: {results["privacy_unit"]}',
           f'model selected at epoch {release["best_epoch"]} by {release["selection"]}; '
           f'pretrained={results["pretrained"]}',
           f'results: {Path(results["workdir"]) / "results.json"}']
  if results.get('data_note'):
    lines.append(results['data_note'])
  return lines
