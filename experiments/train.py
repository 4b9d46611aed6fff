"""One experiment end to end: data, model, private training, selection, results.json.

`train_and_evaluate(config)` checks every input before it writes anything, so a bad flag or
data folder leaves the workdir untouched; `experiments.run` only parses flags.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dpjax import accounting
from dpjax import metrics as metrics_lib
from dpjax import models
from dpjax import sampling
from dpjax import secret_keys
from dpjax import weights as weights_lib
from dpjax.audit import canaries as canaries_lib
from dpjax.data import datasets
from experiments import audit
from experiments import checkpoint
from experiments import config_checks
from experiments import consistency
from experiments import demo_data
from experiments import feature_cache
from experiments import metric_writers
from experiments import parallel
from experiments import privacy_plan
from experiments import provenance
from experiments import remote_paths
from experiments import results as results_lib
from experiments import selection as selection_lib
from experiments import steps
from experiments.config_checks import ConfigError
from experiments.workdir import WorkdirLock
from experiments.workdir import check_writable_dir


def default_workdir(config) -> Path:
  # Another split is another run: its own folder, not a refusal of the default one.
  split = f'_split{config.split_seed}' if config.split_seed else ''
  return Path('runs') / f'{config.dataset}_{config.mech}_beta{config.beta:g}_seed{config.seed}{split}'

_SUM_KEYS = ('loss_sum', 'correct', 'count', 'units', 'num_clipped', 'sum_norms', 'steps',
             'nonfinite_examples', 'params_nonfinite')


@dataclasses.dataclass
class Plateau:
  """torch's ReduceLROnPlateau(mode='min', factor, patience, threshold=1e-4 relative), per epoch.

  Not `optax.contrib.reduce_on_plateau`: that transformation reads a loss inside the update,
  step by step, and scales the updates; here the signal is the validation loss at the end of
  each epoch (the paper's schedule), and under DP-SGD a training loss fed to it would make the
  learning rate depend on training data outside the mechanism."""
  patience: int = 3
  factor: float = 0.1
  threshold: float = 1e-4
  best: float = float('inf')
  bad_epochs: int = 0

  def should_reduce(self, value: float) -> bool:
    if value < self.best * (1 - self.threshold):
      self.best, self.bad_epochs = value, 0
      return False
    self.bad_epochs += 1
    if self.bad_epochs > self.patience:
      self.bad_epochs = 0
      return True
    return False


# Where a run goes, how it shows progress and logs its metrics, how its processes meet, and where
# it computes its fixed features (cache_features: once, or at every step): not what it computes.
# Paths that may name a bucket, staged to local copies whose location is no part of the run.
REMOTE_FIELDS = ('data_dir', 'weights')
DEPLOYMENT_FIELDS = ('workdir', 'progress', 'cache_dir', 'distributed', 'coordinator_address',
                     'num_processes', 'process_id', 'heartbeat_timeout_s', 'cache_features',
                     'metric_writers')


def _fingerprint(config) -> dict[str, Any]:
  """The config fields that determine the result; a bucket's local copy counts as the bucket
  (`remote_paths.original_path`), wherever the copy was made."""
  fields = config if isinstance(config, dict) else config.to_dict()
  return {k: remote_paths.original_path(v) if k in REMOTE_FIELDS and isinstance(v, str) else v
          for k, v in fields.items() if k not in DEPLOYMENT_FIELDS}


def _say(line: str, error: bool = False) -> None:
  """A line on the console, from process 0 only (tqdm-safe)."""
  if parallel.is_first_process():
    tqdm.write(line, file=sys.stderr if error else sys.stdout)


@dataclasses.dataclass
class _Progress:
  """Everything the loop accumulates besides the TrainState; checkpointed with it."""
  best_params: Any
  epochs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  sums: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(_SUM_KEYS, 0.0))
  selection: str = 'val_loss'  # experiments.selection's rule, resolved.
  best_score: tuple[float, ...] = (-float('inf'),)  # experiments.selection.score's.
  best_epoch: int = -1
  epsilon: float = 0.0
  plateau: Plateau = dataclasses.field(default_factory=Plateau)

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
              'train_accuracy': self.sums['correct'] / count,
              **{f'val_{name}': value for name, value in val.items()},
              'mean_batch_images': self.sums['count'] / steps,
              'nonfinite_examples': self.sums['nonfinite_examples']}
    if private:
      units = max(self.sums['units'], 1.0)
      record.update(epsilon=self.epsilon, fraction_clipped=self.sums['num_clipped'] / units,
                    mean_grad_norm=self.sums['sum_norms'] / units,
                    mean_batch_units=self.sums['units'] / steps)
    self.epochs.append(record)
    score = selection_lib.score(val, self.selection)  # On validation only; never test.
    if selection_lib.is_better(score, self.best_score, self.best_epoch, self.selection):
      self.best_score, self.best_epoch = score, epoch
      self.best_params = get_params()
    self.sums = dict.fromkeys(_SUM_KEYS, 0.0)

  def to_meta(self) -> dict[str, Any]:
    return {'epochs': self.epochs, 'sums': self.sums, 'selection': self.selection,
            'best_score': list(self.best_score), 'best_epoch': self.best_epoch, 'epsilon': self.epsilon,
            'plateau': dataclasses.asdict(self.plateau)}

  @classmethod
  def from_meta(cls, meta, best_params) -> _Progress:
    # The best score is recomputed from the history, as this version scores it (the saved one
    # may be an older version's: unrounded, or without today's tie-break); the epoch it names
    # is the saved model's (`check_same_choice`, before any resume).
    selection_lib.check_same_choice(meta['epochs'], meta['selection'], meta['best_epoch'],
                                    'its checkpointed run')
    best_epoch, best_score = selection_lib.replay(meta['epochs'], meta['selection'])
    return cls(best_params=best_params, epochs=meta['epochs'], sums=meta['sums'],
               selection=meta['selection'], best_score=best_score, best_epoch=best_epoch,
               epsilon=meta['epsilon'], plateau=Plateau(**meta['plateau']))


def operating_point(val: dict[str, Any], test: dict[str, Any]) -> dict[str, Any]:
  """The decision threshold of a binary model chosen on validation (balanced accuracy), and the
  validation and test numbers at it: a private model that ranks well but whose argmax sits at
  the class prior shows what it can do at a threshold a user could deploy. Test is read once,
  after the threshold is fixed."""
  threshold = metrics_lib.balanced_threshold(val['probs'][:, 1], val['labels'] == 1)
  return {'threshold': threshold,
          'chosen_on': 'validation, maximising balanced accuracy (test never used)',
          'val': metrics_lib.report_at_threshold(val['probs'][:, 1], val['labels'] == 1, threshold),
          'test': metrics_lib.report_at_threshold(test['probs'][:, 1], test['labels'] == 1,
                                                  threshold)}


def differing_flags(saved: dict[str, Any], current: dict[str, Any]) -> str:
  """'--momentum: 0.0 -> 0.9, ...' for the fields two config fingerprints disagree on."""
  names = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
  shown = [f'--{k}: {saved.get(k)!r} -> {current.get(k)!r}' for k in names[:6]]
  return ', '.join(shown + ([f'and {len(names) - 6} more'] if len(names) > 6 else []))


# What a saved run must share with this version besides its settings and data: how units are
# split (an older version permuted the whole list; another drew it from --seed, not
# --split_seed), how its data fingerprint is made (keyed with the workdir's salt) and what its
# release holds. A run of another format is refused, never reused or resumed onto another split.
RUN_FORMAT = (f'split={datasets.SPLIT_HASH_PERSON.decode()}+split_seed;fingerprint=keyed-bytes;'
              'release=5+digest')

# Flags a finished run is reused with, and a killed one resumed with, whatever their value: where
# checkpoints fall changes nothing; the evaluation batch and the clipping chunk change only the
# order in which float sums accumulate (the same examples, the same per-example clipping, the
# same noise draws: the sampler's draws and every key depend on the step and the example ids,
# not on the padding or the chunks), so results agree to float rounding, not bit for bit.
RESULT_NEUTRAL_FIELDS = {'checkpoint_every_steps': False, 'eval_batch_size': True,
                         'microbatch_size': True}  # True: float-level differences.

# <workdir>/secret_salt keys the run's data fingerprint: the fingerprint alone, unkeyed, would be
# a hash of every training file's name, size and time (membership inference for anyone holding
# candidate data). It lives with the run, so a changed or deleted --cache_dir does not orphan it.
RUN_SALT_FILE = 'secret_salt'
# <workdir>/release.sha256.json: {file under release/: sha256}, written with the release and
# checked before a finished run is reused.
RELEASE_DIGEST_FILE = 'release.sha256.json'


def _check_same_run(workdir: Path, what: str, saved_config: dict[str, Any], config,
                    saved_data: str | None, data_fingerprint: str,
                    saved_format: str | None) -> None:
  """Refuses (one line) a workdir whose run had other settings, other data or another format."""
  if saved_format != RUN_FORMAT:
    raise ConfigError(f'--workdir={workdir} holds {what} made by another dpjax version (run format '
                      f'{saved_format or "unrecorded"}, this version {RUN_FORMAT}: other splits, '
                      'data fingerprints or release contents); use a new --workdir')
  saved, current = _fingerprint(saved_config), _fingerprint(config)
  if _without_neutral(saved) != _without_neutral(current):
    raise ConfigError(f'--workdir={workdir} holds {what} with other settings '
                      f'({differing_flags(_without_neutral(saved), _without_neutral(current))}); '
                      'use a new --workdir')
  if saved_data != data_fingerprint:
    # No digest in the message: even keyed ones need not be shown, and consoles get pasted.
    raise ConfigError(f'--workdir={workdir} holds {what} computed on other data: the data under '
                      f'{config.data_dir or "the demo data"} differ from what this workdir was '
                      'made with; use a new --workdir, or restore the data')


def _without_neutral(fingerprint: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in fingerprint.items() if k not in RESULT_NEUTRAL_FIELDS}


def neutral_note(saved_config: dict[str, Any], config) -> str:
  """'' or the flags of RESULT_NEUTRAL_FIELDS that differ from the saved run, and what that means."""
  saved, current = _fingerprint(saved_config), _fingerprint(config)
  names = [k for k in RESULT_NEUTRAL_FIELDS if k in saved and saved.get(k) != current.get(k)]
  if not names:
    return ''
  changed = ', '.join(f'--{k}: {saved.get(k)!r} -> {current.get(k)!r}' for k in names)
  if any(RESULT_NEUTRAL_FIELDS[k] for k in names):
    return (f'{changed}: same examples, clipping and noise; sums accumulate in another order, so '
            'numbers may differ at float rounding level from an uninterrupted run')
  return f'{changed}: changes nothing the run computes'


def run_salt(workdir: Path) -> bytes:
  """The key of this run's data fingerprint: `<workdir>/secret_salt`'s, else fresh (written when
  the workdir is made); process 0's on every process, so that all compare the same digest."""
  salt = datasets.read_salt(workdir / RUN_SALT_FILE) or os.urandom(datasets.SALT_BYTES)
  words = parallel.broadcast_from_first_process(np.frombuffer(salt, '<u4').tolist())
  return np.asarray(words, '<u4').tobytes()


def _keep_run_salt(workdir: Path, salt: bytes) -> None:
  """Writes the run's salt (0600) into its new workdir, before anything that records the
  fingerprint; refuses a workdir that another run salted meanwhile."""
  if parallel.is_first_process() and datasets.create_salt(workdir / RUN_SALT_FILE, salt) != salt:
    raise ConfigError(f'--workdir={workdir} was started by another run meanwhile; use a new '
                      '--workdir')


def load_splits(config, data_dir, scan, cache_dir=None) -> datasets.DatasetSplits:
  """The run's data: train/val/test drawn by --split_seed, never --seed, so that the seeds of a
  grid (init, augmentation) all hold out the same units; each seed drawing its own split would
  put a quarter of the patients in some seed's validation, outside every guarantee."""
  return datasets.load_dataset(
      config.dataset, data_dir, config.image_size, seed=config.split_seed,
      skip_bad=config.skip_bad, cache_dir=cache_dir, scan=scan,
      progress=bool(config.data_dir) and config.progress and parallel.is_first_process())


def _no_intact_checkpoint(directory: Path, num_damaged: int) -> ConfigError:
  return ConfigError(f'no intact checkpoint in {directory} ({num_damaged} damaged): delete that '
                     'folder to start the run over (with fresh noise: anything already published '
                     'from the lost run, such as a validation accuracy, composes with the new run)')


def _finished_results(workdir: Path, config, data_fingerprint: str,
                      selection: str) -> dict[str, Any] | None:
  """The results of a finished run of the same config on the same data, so it is not redone.

  results.json of other settings or other data is refused, never silently returned.
  """
  try:
    results = json.loads((workdir / 'results.json').read_text())
  except (OSError, ValueError):
    return None
  _check_same_run(workdir, 'finished results', results.get('config', {}), config,
                  results.get('data_fingerprint'), data_fingerprint, results.get('run_format'))
  selection_lib.check_same_rule(results.get('release', {}).get('selection_rule'), selection,
                                f'--workdir={workdir}: its finished run')
  selection_lib.check_same_choice(results['release'].get('history', []), selection,
                                  results['release'].get('best_epoch'),
                                  f'--workdir={workdir}: its finished run')
  # What is reused is release/: checked against the digest taken when it was written, so a
  # tampered or truncated model is never passed on as this run's.
  try:
    recorded = json.loads((workdir / RELEASE_DIGEST_FILE).read_text())
  except (OSError, ValueError):
    recorded = {f'{RELEASE_DIGEST_FILE} (its record)': ''}
  changed = provenance.digest_difference(recorded, provenance.folder_digest(workdir / 'release'))
  if changed:
    raise ConfigError(f'--workdir={workdir}: its release/ is not what the run wrote ({changed}); '
                      'restore it from a copy, or use a new --workdir (a new run draws fresh '
                      'noise: anything published from this one composes with it)')
  note = neutral_note(results.get('config', {}), config)
  if note:
    _say(f'note: reusing the finished run in {workdir}; {note}', error=True)
  if parallel.is_first_process() and (workdir / 'checkpoints').exists():
    # Left by a run stopped after its results were written: they hold the secret key.
    shutil.rmtree(workdir / 'checkpoints', ignore_errors=True)
  return {**results, 'workdir': str(workdir), 'reused': True}


class _Skipped(NamedTuple):
  """A checkpoint a resume does not use, removed once the resume has succeeded."""
  step: int
  why: str  # 'is damaged (...)', or why this version would not have kept its model.
  damaged: bool

  @classmethod
  def of_damaged(cls, error: checkpoint.CheckpointDamaged) -> _Skipped:
    return cls(error.step, f'is damaged ({error.reason})', damaged=True)


def _intact_checkpoints(workdir: Path, config, data_fingerprint: str, selection: str
                        ) -> tuple[list[tuple[int, dict, dict]], list[_Skipped]]:
  """(step, meta, secret) of the checkpoints whose metadata read back, newest first, and
  those skipped: damaged, or holding a model this version's selection rule would not have
  kept. Checkpoints of other settings or data are refused. Reads only: nothing is created
  where there are no checkpoints.
  """
  if not (workdir / 'checkpoints').is_dir():
    return [], []
  ckpt = checkpoint.RunCheckpointer(workdir)
  try:
    saved, intact, damaged, unchosen = ckpt.steps(), [], [], []
    for step in saved:
      try:
        meta, secret = ckpt.read_json(step)
      except checkpoint.CheckpointDamaged as e:
        damaged.append(_Skipped.of_damaged(e))
        continue
      _check_same_run(workdir, 'a run', meta.get('config', {}), config,
                      meta.get('data_fingerprint'), data_fingerprint, meta.get('run_format'))
      selection_lib.check_same_rule(meta.get('selection'), selection,
                                    f'--workdir={workdir}: its checkpointed run')
      try:
        selection_lib.check_same_choice(meta.get('epochs', []), selection,
                                        meta.get('best_epoch'),
                                        f'--workdir={workdir}: its checkpointed run')
      except selection_lib.SelectionRuleChanged as e:
        # Like a damaged one: another checkpoint (older, its noise re-derived from the same
        # secret key) may still be one this version would have made.
        unchosen.append((step, e))
        continue
      note = '' if intact else neutral_note(meta.get('config', {}), config)
      if note:
        _say(f'note: resuming with {note}', error=True)
      intact.append((step, meta, secret))
  finally:
    ckpt.close()
  if saved and not intact:
    if unchosen:
      raise unchosen[0][1]
    raise _no_intact_checkpoint(workdir / 'checkpoints', len(damaged))
  return intact, damaged + [_Skipped(step, e.why_for('this run'), damaged=False)
                            for step, e in unchosen]


def _remove_skipped_checkpoints(workdir: Path, ckpt, skipped: list[_Skipped]) -> None:
  """Deletes the checkpoints a resume skipped, once it has restored another and before it
  saves any: left in place, orbax would skip every save up to their step (it never saves
  behind its newest) and keep them in place of a usable fallback. Their state is re-derived
  from an older one (the same secret key, the same batches and noise)."""
  def remove():
    if not parallel.is_first_process():
      return  # The folder is shared: process 0 removes, the others wait for it.
    for step, _, _ in skipped:
      try:
        shutil.rmtree(workdir / 'checkpoints' / str(step))
      except FileNotFoundError:
        pass  # Already gone: nothing to silence the saves.
      except OSError as e:
        raise ConfigError(f'--workdir={workdir}: cannot remove its checkpoint of step {step}, '
                          f'which the resume skips ({e}); remove it or use a new --workdir'
                          ) from None
  parallel.first_process_first('removing the checkpoints a resume skips', remove)
  ckpt.forget_removed()
  for step, why, _ in sorted(skipped, reverse=True):
    _say(f'warning: --workdir={workdir}: its checkpoint of step {step} {why}; removed it',
         error=True)


def _make_sampler(config, plan: privacy_plan.PrivacyPlan, train_split, mesh, key: jax.Array):
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


def _cache_root(config) -> Path:
  return Path(config.cache_dir).expanduser() if config.cache_dir else datasets.default_cache_root()


def _fetch_imagenet_weights(config) -> None:
  """Downloads and converts torchvision's ImageNet ResNet-18 once (cache), if needed.

  Offline, the demo trains from scratch and says so; a run on real data stops (exit 2), so
  that a reproduction of the paper never silently trains without pretraining.
  """
  if config.weights != 'imagenet':
    return
  try:
    weights_lib.ensure_imagenet_checkpoint(
        cache_dir=_cache_root(config), progress=config.progress and parallel.is_first_process())
  except weights_lib.WeightsUnavailable as error:
    if config.data_dir:
      raise ConfigError(f'--weights=imagenet: {error}; or pass --weights=none to train from '
                        'scratch on purpose') from None
    _say(f'note: no ImageNet weights ({error.reason}); the demo trains from scratch', error=True)


def _pretrained_available(config) -> bool:
  spec = config.weights
  if spec == 'none':
    return False
  if spec == 'imagenet':
    return weights_lib.find_imagenet_checkpoint(_cache_root(config)) is not None
  if not Path(spec).exists():
    raise ConfigError(f'--weights={spec}: no such file or folder')
  return True


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
  plan: privacy_plan.PrivacyPlan
  norm: str
  model: Any
  state: steps.TrainState
  train_step: Any
  eval_step: Any
  sampler: Any
  pretrained: bool
  weights_note: str
  clipping_method: str | None = None  # DP-SGD only: 'ghost' or 'vmap', as the step runs.
  canaries: canaries_lib.GradientCanaries | None = None
  ldp_key: jax.Array | None = None  # The secret key of the LDP release (for its audit).
  # z of the private feature-statistics release this run made (charged to its ledger), if any.
  feature_stats_noise: float | None = None


def privacy_units(config, data) -> tuple[int, str]:
  """(units in the training split, 'patient' or 'image'): what the run samples and clips."""
  unparsed = data.patients['unparsed_file_names'] if data.patients else 0
  unit = config_checks.resolve_privacy_unit(config, data.train.patients is not None, unparsed)
  return (len(data.train.units()) if unit == 'patient' else len(data.train)), unit


def training_units(config) -> tuple[int, str]:
  """`privacy_units` of `config`'s data, loaded (and prepared, cached) as a run loads them:
  for planning runs before any starts (experiments.tune)."""
  cache_dir = config.cache_dir or None
  data_dir = config.data_dir or demo_data.ensure_demo_data(config.dataset, cache_dir)
  scan = datasets.scan_dataset(config.dataset, data_dir, skip_bad=config.skip_bad)
  return privacy_units(config, load_splits(config, data_dir, scan, cache_dir))


def build_run(config, data, mesh, private_key: jax.Array) -> Run:
  """Model, weights, optimizer, jitted steps and sampler of `config` on `data` over `mesh`.

  `private_key` is the run's secret root key (`resolve_private_key`); every stream the
  guarantee depends on derives from it, the public ones from --seed.
  """
  num_units, unit = privacy_units(config, data)
  plan = privacy_plan.plan_privacy(config, num_units, unit)  # Also checks the batch fits the data.
  norm = config_checks.resolve_norm(config.norm, config.mech, _pretrained_available(config),
                                     config.arch)
  model = models.create_model(data.num_classes, norm, arch=config.arch,
                              dtype=jnp.dtype(config.compute_dtype),
                              grayscale=config.dataset in steps.GRAYSCALE_DATASETS,
                              feature_norm=config.feature_norm,
                              precomputed_features=feature_cache.wanted(config))
  input_shape = (1, config.image_size, config.image_size, 3)
  if feature_cache.wanted(config):  # The model takes the cached features.
    input_shape = feature_cache.feature_shape(model, config.image_size)
  variables, pretrained, weights_note = weights_lib.load_pretrained(
      config.weights, model, data.num_classes, steps.stream_key(config.seed, steps.INIT_STREAM),
      input_shape, cache_dir=_cache_root(config))
  if config.arch in models.SCATTERNET_ARCHITECTURES and config.feature_norm == 'data_norm':
    variables, feature_stats_noise = _with_feature_stats(
        variables, config, plan, model, data.train,
        steps.private_stream(private_key, steps.FEATURE_STATS))
  else:
    feature_stats_noise = None
  sampler = _make_sampler(config, plan, data.train, mesh,
                          steps.private_stream(private_key, steps.SAMPLING))
  tx = steps.make_optimizer(config, plan, steps.private_stream(private_key, steps.NOISE))
  state = parallel.replicate(
      steps.create_train_state(variables, tx, config.seed, private_key,
                               trainable=config.trainable, averaging=config.averaging), mesh)
  canaries = None
  if config.audit and plan.mech == 'dpsgd':
    canaries = canaries_lib.make_gradient_canaries(  # On the trained parameters only.
        steps.private_stream(private_key, steps.CANARY),
        models.split_params(variables['params'], config.trainable)[0],
        config.audit_canaries)
  clipping_method = config_checks.resolve_clipping_method(config, norm) if plan.mech == 'dpsgd' else None
  return Run(plan=plan, norm=norm, model=model, state=state, canaries=canaries,
             clipping_method=clipping_method,
             train_step=steps.make_train_step(model, tx, config, plan, norm, mesh, canaries),
             eval_step=steps.make_eval_step(model, config, mesh), sampler=sampler,
             pretrained=pretrained, weights_note=weights_note,
             ldp_key=steps.private_stream(private_key, steps.LDP),
             feature_stats_noise=feature_stats_noise)


def _eval_input(config, images_uint8):
  """Evaluation-mode model input of uint8 images: centre crop and normalisation."""
  return steps.prepare_images(images_uint8, None, image_size=config.image_size, train=False,
                              augment=False, key=None, ldp_fn=None)


def _cached_features(config, data):
  """`data` with every split's ScatterNet features computed once (experiments.feature_cache)."""
  scatterer = models.create_model(data.num_classes, models.GROUP_NORM, arch=config.arch,
                                  grayscale=config.dataset in steps.GRAYSCALE_DATASETS)
  needed = feature_cache.feature_bytes(data, scatterer)
  if needed > feature_cache.MAX_CACHE_BYTES:
    raise ConfigError(f'--cache_features: the scattering features of this data need '
                      f'{needed / 2**30:.1f} GiB of memory (at most '
                      f'{feature_cache.MAX_CACHE_BYTES / 2**30:.0f} GiB); pass '
                      '--cache_features=false to scatter on the fly')
  return feature_cache.cache_splits(data, scatterer, lambda x: _eval_input(config, x),
                                    config.eval_batch_size)


def _with_feature_stats(variables, config, plan, model, train_split, key):
  """`variables` with the ScatterNet's feature mean and variance estimated on the training split.

  Under DP-SGD a Gaussian release of per-unit clipped statistics (`dpjax.feature_stats`, noise
  z_s * C_s, the count of units public as for the sampler), charged to the ledger as its own
  event; otherwise exact statistics (no guarantee is claimed there). Images are centre-cropped
  and never augmented: one value per unit, whatever the epoch.
  """
  from dpjax import feature_stats  # pylint: disable=import-outside-toplevel
  if feature_cache.wanted(config):  # The split already holds the features.
    features_of = lambda features: features
  else:
    features_of = jax.jit(lambda images: models.scattering_features(model, _eval_input(config,
                                                                                     images)))
  units = train_split.patients if plan.privacy_unit == 'patient' else np.arange(len(train_split))

  def batches():
    for start in range(0, len(train_split), config.eval_batch_size):
      rows = np.arange(start, min(start + config.eval_batch_size, len(train_split)))
      images, _, _ = train_split.gather(rows)
      yield np.asarray(features_of(jnp.asarray(images))), units[rows]

  if plan.mech not in ('dpsgd', 'none'):
    raise ConfigError(f'--feature_norm=data_norm cannot be used with --mech={plan.mech}')
  private = plan.mech == 'dpsgd'
  stats = feature_stats.private_feature_stats(
      batches(), l2_norm_clip=config.feature_stats_clip if private else 1e30,
      noise_multiplier=config.feature_stats_noise_multiplier if private else 0.0, key=key,
      expected_num_units=plan.num_units)
  batch_stats = dict(variables.get('batch_stats', {}))
  batch_stats.update(feature_mean=jnp.asarray(stats.mean, jnp.float32),
                     feature_var=jnp.asarray(stats.var, jnp.float32))
  return {**variables, 'batch_stats': batch_stats}, (stats.noise_multiplier if private else None)


def _restore_newest_intact(ckpt, intact, skipped: list[_Skipped], state, best_params):
  """(state, best, meta) of the newest checkpoint whose arrays read back intact, and the
  checkpoints skipped (`skipped` and those newer, whose arrays are damaged)."""
  damaged = []
  for step, _, _ in intact:
    try:
      return (*ckpt.restore(step, state, best_params), skipped + damaged)
    except checkpoint.CheckpointDamaged as e:
      damaged.append(_Skipped.of_damaged(e))
  raise _no_intact_checkpoint(ckpt.directory,
                              sum(s.damaged for s in skipped) + len(damaged))


def train_and_evaluate(config, workdir: str | Path | None = None) -> dict[str, Any]:
  """Runs one experiment and writes `<workdir>/results.json`; returns the results."""
  config_checks.validate_config(config)
  metric_writers.check_available(config.metric_writers)
  workdir = Path(workdir or config.workdir or default_workdir(config))
  check_writable_dir(workdir, '--workdir')
  check_writable_dir(_cache_root(config), '--cache_dir')
  if config.distributed or config.coordinator_address:
    parallel.initialize_distributed(config.coordinator_address, config.num_processes,
                                    config.process_id, config.heartbeat_timeout_s)
  # Before anything else: processes started with other flags diverge from here on.
  consistency.check_same_settings(consistency.job_settings(_fingerprint(config)))
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
  cache_dir = config.cache_dir or None
  with checkpoint.disk_full_names(_cache_root(config), 'writing the demo data'):
    data_dir = config.data_dir or parallel.first_process_first(
        'demo data', lambda: demo_data.ensure_demo_data(config.dataset, cache_dir))
  scan = datasets.scan_dataset(config.dataset, data_dir, skip_bad=config.skip_bad)
  salt = run_salt(workdir)
  consistency.check_same_data(scan, salt)  # Every process holds the same data, or none goes on.
  # By content (files whose size and mtime match the recorded listing are not read again).
  data_fingerprint, data_listing = provenance.data_content_fingerprint(
      scan, salt, provenance.read_data_listing(workdir) if
      datasets.read_salt(workdir / RUN_SALT_FILE) == salt else None)
  selection = selection_lib.resolve(config.selection, protocol=config.protocol,
                                    num_classes=len(scan.class_names))
  finished = _finished_results(workdir, config, data_fingerprint, selection)
  if finished is not None:
    return finished
  intact, skipped = _intact_checkpoints(workdir, config, data_fingerprint, selection)
  by_patient = config_checks.resolve_privacy_unit(
      config, scan.dataset == 'pneumonia', scan.unparsed_patient_names) == 'patient'
  privacy_plan.check_target_is_private(config, datasets.expected_train_units(scan, by_patient))
  _fetch_imagenet_weights(config)
  with checkpoint.disk_full_names(_cache_root(config), 'preparing the data'):
    data = parallel.first_process_first('data preparation',
                                        lambda: load_splits(config, data_dir, scan, cache_dir))
  if not config.data_dir:
    data = dataclasses.replace(data, is_demo=True, source='demo')
  if feature_cache.wanted(config):
    data = _cached_features(config, data)
  mesh = parallel.make_mesh()
  private_key, secret = resolve_private_key(config, workdir)
  run = build_run(config, data, mesh, private_key)  # Checks everything that can still fail on input.
  config_checks.check_checkpoint_saves(config, privacy_plan.steps_per_epoch(config,
                                                                            run.plan.num_units))
  workdir.mkdir(parents=True, exist_ok=True)
  lock.acquire()  # A new folder: locked as soon as it exists.
  _keep_run_salt(workdir, salt)
  if parallel.is_first_process():  # Keyed like the fingerprint: the curator's, 0600.
    provenance.write_json_atomic(workdir / provenance.DATA_LISTING_FILE, data_listing, mode=0o600)
  num_train, plan, norm, state = len(data.train), run.plan, run.norm, run.state
  train_step, eval_step, sampler = run.train_step, run.eval_step, run.sampler
  eval_batch_size = parallel.round_up_to_devices(config.eval_batch_size, mesh)
  ledger = None
  if plan.mech == 'dpsgd':
    ledger = accounting.PrivacyLedger(sampling=config.sampling,
                                      steps_per_epoch=privacy_plan.shuffled_steps_per_epoch(config, plan.num_units))
    # Charged exactly as made (before any step), and as the calibration planned it.
    made = () if run.feature_stats_noise is None else (run.feature_stats_noise,)
    if made != privacy_plan.feature_stats_releases(config):
      raise RuntimeError(f'feature statistics released with z={made}, planned '
                         f'{privacy_plan.feature_stats_releases(config)}')
    for z_stats in made:
      ledger.record_gaussian(z_stats, 'feature_stats')

  spe = privacy_plan.steps_per_epoch(config, plan.num_units)
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
    header.append(results_lib.DEMO_NOTE)
  if config.progress:
    for line in header:
      _say(line)

  # Evaluated, selected and released: the averaged parameters when averaging is on
  # (post-processing of the trajectory), the frozen part merged in.
  averaged = config.averaging != 'none'

  def released_params(state):
    return jax.device_get((state.model_params(averaged=averaged), state.batch_stats))

  progress = _Progress(best_params=released_params(state), selection=selection,
                       plateau=Plateau(patience=config.plateau_patience))
  ckpt = checkpoint.RunCheckpointer(workdir)
  fingerprint = _fingerprint(config)
  if intact:
    state, best, meta, skipped = _restore_newest_intact(ckpt, intact, skipped, state,
                                                        progress.best_params)
    # Its arrays match their digest; the key it was built with, and its ledger, must match
    # them: batches drawn with another key beside the same noise would cancel the noise.
    if secret_keys.key_to_data(state.private_key) != secret_keys.key_to_data(private_key):
      raise ConfigError(f'the checkpoints in {ckpt.directory} disagree on the run\'s secret key: '
                        'delete that folder to start the run over (with fresh noise)')
    progress = _Progress.from_meta(meta, best)
    if ledger is not None:
      fresh = ledger
      ledger = accounting.PrivacyLedger.from_dict(meta['ledger'])
      planned = (plan.accounted_noise_multiplier, plan.sampling_prob)
      if (any((run_.noise_multiplier, run_.sampling_prob) != planned for run_ in ledger.runs)
          or ledger.num_steps != int(state.step)
          or (ledger.sampling, ledger.steps_per_epoch, ledger.gaussian_events)
          != (fresh.sampling, fresh.steps_per_epoch, fresh.gaussian_events)):
        # Never mix: the resumed steps must be charged exactly like the recorded ones.
        raise ConfigError(f'the checkpoint in {ckpt.directory} recorded other releases than '
                          'this run plans (steps, their noise, sampling or accounting, or the '
                          'feature statistics); use a new --workdir')
    if skipped:
      _remove_skipped_checkpoints(workdir, ckpt, skipped)
    _say(f'resumed from step {int(state.step)} ({ckpt.directory})', error=True)

  def save_checkpoint():
    meta = {**progress.to_meta(), 'config': fingerprint, 'data_fingerprint': data_fingerprint,
            'run_format': RUN_FORMAT,
            'ledger': ledger.to_dict() if ledger is not None else None}
    ckpt.save(int(state.step), state, progress.best_params, meta, secret)

  seed_public = config.noise_seed >= 0
  # <workdir>/metrics.jsonl and tensorboard/ (covered), not_covered/ (the curator's): from the
  # step this run starts at, the epoch ending there written again from the checkpoint.
  writers = metric_writers.create_run_writers(workdir, int(state.step), config.metric_writers)
  for record in progress.epochs:
    if record['step'] >= int(state.step):
      writers.write_epoch(record, seed_public)

  def train_one_step() -> bool:
    """One step (and the epoch's end after its last); True when an epoch ended."""
    nonlocal state
    step = int(state.step)
    indices, mask = sampler.sample(step)
    state, step_metrics = train_step(state, steps.load_batch(data.train, indices, mask, mesh))
    step_metrics = jax.device_get(step_metrics)
    steps.check_finite(step_metrics, step)
    progress.add(step_metrics)
    if ledger is not None:
      ledger.record_step(plan.accounted_noise_multiplier, plan.sampling_prob)
    if (step + 1) % spe == 0:  # End of an epoch: epsilon so far, validation, selection.
      if ledger is not None:
        progress.epsilon = ledger.epsilon(config.delta, config.accountant)
      val = steps.summarize(steps.evaluate(eval_step, state.model_params(averaged=averaged),
                                           state.batch_stats, data.val,
                                           eval_batch_size, mesh))
      progress.end_epoch((step + 1) // spe, step + 1, val, ledger is not None,
                         lambda state=state: released_params(state),
                         steps.learning_rate(state.opt_state))
      if config.lr_schedule == 'plateau' and progress.plateau.should_reduce(val['loss']):
        lowered = steps.learning_rate(state.opt_state) * progress.plateau.factor
        state = state.replace(opt_state=steps.set_learning_rate(state.opt_state, lowered))
      # Written (durably) before the checkpoint: a resume from it never misses the epoch.
      writers.write_epoch(progress.epochs[-1], seed_public)
      writers.flush()
      save_checkpoint()
      return True
    if config.checkpoint_every_steps and (step + 1) % config.checkpoint_every_steps == 0:
      save_checkpoint()
    return False

  try:
    if int(state.step) < total_steps:
      # XLA compiles the step on its first call (minutes for a ResNet on a CPU): run it before
      # the bar starts, so that the bar's rate and ETA count compiled steps only.
      if config.progress:
        _say('compiling the training step (first step)...')
      compile_start = time.time()
      train_one_step()
      if config.progress:
        _say(f'first step done in {time.time() - compile_start:.0f} s')
    bar = tqdm(total=total_steps, initial=int(state.step), desc=label,
               disable=not (config.progress and parallel.is_first_process()),
               unit='step', dynamic_ncols=True)
    bar.set_postfix(progress.postfix(ledger is not None), refresh=False)
    while int(state.step) < total_steps:
      ended = train_one_step()
      bar.update(1)
      bar.set_postfix(progress.postfix(ledger is not None), refresh=ended)
    bar.close()
  except BaseException:
    writers.close_quietly()
    raise
  ckpt.close()

  best_params, best_batch_stats = progress.best_params
  final = {name: steps.evaluate(eval_step, best_params, best_batch_stats, split,
                                eval_batch_size, mesh)
           for name, split in (('train', data.train), ('val', data.val), ('test', data.test))}
  test_labels = final['test']['labels']
  test_report = metrics_lib.classification_report(final['test']['probs'], test_labels)
  val_summary = steps.summarize(final['val'])
  privacy = results_lib.privacy_summary(config, plan, ledger, data)
  released_history, uncovered_history = results_lib.split_history(
      progress.epochs, seed_public=config.noise_seed >= 0)
  release = {
      'covered_by': privacy['guarantee'],
      'note': results_lib.RELEASE_NOTE,
      'model_file': None,
      'best_epoch': progress.best_epoch,
      'selection': f'{selection_lib.DESCRIPTIONS[selection]} (test never used for selection)',
      'selection_rule': selection,
      'val_accuracy': val_summary['accuracy'],
      'val_metrics': val_summary,
      'test_accuracy': test_report['accuracy'],
      'majority_baseline': float(np.bincount(test_labels, minlength=data.num_classes).max()
                                 / len(test_labels)),
      'test_metrics': test_report,
      'accuracy_note': ('accuracies of the selected model in eval mode on unperturbed images; '
                        'LDP noise and augmentation apply only to what training sees'),
      'history': released_history,
  }
  if data.num_classes == 2:
    release['operating_point'] = operating_point(final['val'], final['test'])
  train_summary = steps.summarize(final['train'])
  not_covered = {
      'note': results_lib.NOT_COVERED_NOTE,
      'train_accuracy': train_summary['accuracy'],
      'train_loss': train_summary['loss'],
      'history': uncovered_history,
      'data': {'patients': data.patients, 'skipped_files': list(data.skipped)},
  }
  writers.write_final(int(state.step), release, not_covered)  # Test metrics: once, at the end.
  writers.close()
  results = {
      'dataset': config.dataset, 'mech': config.mech, 'beta': config.beta,
      **privacy,
      'release': release,
      'not_covered': not_covered,
      'epochs': config.epochs, 'steps': int(state.step),
      'data': 'demo' if data.is_demo else str(data.source),
      'data_note': results_lib.DEMO_NOTE if data.is_demo else None,
      'data_fingerprint': data_fingerprint,
      'run_format': RUN_FORMAT,
      'disclosure': results_lib.disclosure(),  # Which fields are public inputs, which private.
      # Images per split: the curator's (results_lib.PRIVATE_FIELDS), never in release/.
      'split_sizes': {'train': num_train, 'val': len(data.val), 'test': len(data.test)},
      'model': {'arch': config.arch, 'norm': norm, 'pretrained': run.pretrained,
                'weights': run.weights_note},
      'pretrained': run.pretrained,
      'config': config.to_dict(),
      **provenance.provenance(),
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
    shared = audit.shared_patient_test_images(data)
    not_covered['audit'] = {'membership': audit.membership_audit(
        final, config.delta, config.seed, None if shared is None else ~shared)}
    if run.canaries is not None:
      # The guesses are chosen from the ledger's epsilon (public), before any canary is scored.
      release['audit'] = {'canaries': audit.canary_audit(
          run.canaries, models.split_params(best_params, config.trainable)[0], config.delta,
          ledger.epsilon(config.delta, config.accountant), seed_public=config.noise_seed >= 0)}
    if config.mech == 'ldp':
      not_covered['audit']['reconstruction'] = audit.reconstruction_audit(
          data, steps.make_ldp_fn(config), run.ldp_key,
          grayscale=config.dataset in steps.GRAYSCALE_DATASETS, beta=config.beta)
  if jax.process_index() == 0:
    with checkpoint.disk_full_names(workdir, 'writing the results'):
      release['model_file'] = results_lib.export_model(workdir, best_params, best_batch_stats)
      results['wall_time_s'] = round(time.time() - start, 1)
      # release/ first, then its digest (checked before any reuse), then results.json, which
      # marks the run finished. A kill before it resumes from the last checkpoint
      # and writes both again; a kill after it leaves checkpoints that the reuse deletes.
      provenance.write_json_atomic(workdir / 'release' / 'release.json',
                                   results_lib.public_release(results))
      provenance.write_json_atomic(workdir / RELEASE_DIGEST_FILE,
                                   provenance.folder_digest(workdir / 'release'))
      # The curator's record (not_covered, the fingerprint): theirs alone; release/ is public.
      provenance.write_json_atomic(workdir / 'results.json', results, mode=0o600)
    # A finished run is reused through results.json and the release alone: its checkpoints,
    # which hold the secret key (enough to subtract the noise from the released model), go.
    shutil.rmtree(ckpt.directory, ignore_errors=True)
  results['workdir'] = str(workdir)
  return results
