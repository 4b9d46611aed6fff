"""Training and evaluation: one jitted step per batch, model selection on validation.

`train_and_evaluate(config, workdir)` is the whole run; `experiments.run` only parses flags.
The step functions are pure `(state, batch) -> (state, metrics)` and are built once per run
by `make_train_step` / `make_eval_step`, so the loop never recompiles between steps.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import accounting
from dpjax import clipping
from dpjax import ghost_clipping
from dpjax import ldp
from dpjax import parallel
from dpjax import run_audit
from dpjax import sampling
from dpjax import transforms
from dpjax.data import preprocess
from dpjax.errors import ConfigError

MECHANISMS = ('none', 'ldp', 'dpsgd')
CLIPPING_METHODS = ('auto', 'ghost', 'vmap')
DATASETS = ('pneumonia', 'aptos')
PRIVACY_UNITS = ('auto', 'patient', 'image')

# Public randomness streams, derived from --seed (published with the results).
_INIT, _AUGMENT = 0, 3
# Private randomness streams, derived from the run's SECRET key (`dpjax.secret_keys`), never
# from --seed: whoever can regenerate them can subtract the noise or replay the sampling.
NOISE, SAMPLING, LDP, CANARY = range(4)


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any  # For DP-SGD it holds the secret noise key (`transforms.GaussianNoiseState`).
  rng: jax.Array  # PUBLIC root key of the per-step augmentation stream (from --seed).
  private_key: jax.Array  # SECRET root key of the LDP and canary streams; checkpoint only.


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
  """What the run will do privately, decided before the first step."""
  mech: str
  privacy_unit: str = 'image'  # What one neighbouring data set adds or removes: 'image' or 'patient'.
  rows_per_unit: int = 1  # Batch rows of one clipped unit: a patient's image slots, or the paper's group.
  noise_multiplier: float | None = None  # z: noise std is z * l2_norm_clip.
  accounted_noise_multiplier: float | None = None  # z per unit of one unit's sensitivity.
  sampling_prob: float | None = None  # Exactly the rate the sampler uses (`sampling.exact_sampling_prob`).
  steps: int | None = None
  target_epsilon: float | None = None
  num_units: int | None = None  # Units (images or patients) in the training split.


def stream_key(seed: int, stream: int) -> jax.Array:
  """A PUBLIC stream (init, augmentation) of --seed."""
  return jax.random.fold_in(jax.random.key(seed), stream)


def private_stream(private_key: jax.Array, stream: int) -> jax.Array:
  """A PRIVATE stream (NOISE, SAMPLING, LDP, CANARY) of the run's secret key."""
  return jax.random.fold_in(private_key, stream)


def validate_config(config) -> None:
  """Raises ConfigError naming the flag for any value that cannot run."""
  if config.dataset not in DATASETS:
    raise ConfigError(f'--dataset must be one of {"|".join(DATASETS)}, got {config.dataset!r}')
  if config.mech not in MECHANISMS:
    raise ConfigError(f'--mech must be one of {"|".join(MECHANISMS)}, got {config.mech!r}')
  if not (config.beta > 0 and math.isfinite(config.beta)):
    raise ConfigError(f'--beta must be a positive number, got {config.beta}')
  positive_ints = ('epochs', 'batch_size', 'image_size', 'eval_batch_size')
  for name in positive_ints:
    if int(getattr(config, name)) <= 0:
      raise ConfigError(f'--{name} must be a positive integer, got {getattr(config, name)}')
  if config.image_size < 32:
    raise ConfigError(f'--image_size must be >= 32 for ResNet-18, got {config.image_size}')
  if config.microbatch_size < 0:
    raise ConfigError(f'--microbatch_size must be >= 0, got {config.microbatch_size}')
  if not 0 < config.delta < 1:
    raise ConfigError(f'--delta must be in (0, 1), got {config.delta}')
  if config.epsilon < 0:
    raise ConfigError(f'--epsilon must be > 0 (or 0 for 1/beta), got {config.epsilon}')
  if config.noise_multiplier < 0:
    raise ConfigError(f'--noise_multiplier must be >= 0, got {config.noise_multiplier}')
  if config.l2_norm_clip <= 0:
    raise ConfigError(f'--l2_norm_clip must be > 0, got {config.l2_norm_clip}')
  if config.sampling not in ('poisson', 'shuffled'):
    raise ConfigError(f'--sampling must be poisson|shuffled, got {config.sampling!r}')
  if config.accountant not in ('pld', 'rdp'):
    raise ConfigError(f'--accountant must be pld|rdp, got {config.accountant!r}')
  if config.ldp_variant not in ldp.VARIANTS:
    raise ConfigError(f'--ldp_variant must be one of {"|".join(ldp.VARIANTS)}, got {config.ldp_variant!r}')
  if config.norm not in ('auto', 'frozen_bn', 'batch_norm', 'group_norm'):
    raise ConfigError(f'--norm must be auto|frozen_bn|batch_norm|group_norm, got {config.norm!r}')
  if config.protocol not in ('sound', 'paper'):
    raise ConfigError(f'--protocol must be sound|paper, got {config.protocol!r}')
  if config.mech == 'dpsgd' and config.norm == 'batch_norm' and config.protocol != 'paper':
    raise ConfigError('--norm=batch_norm cannot be used with --mech=dpsgd: batch statistics mix '
                      'examples and running statistics would be updated without noise; use '
                      'frozen_bn or group_norm (or --protocol=paper to reproduce that flaw)')
  if config.clip_group_size < 1 or config.batch_size % config.clip_group_size:
    raise ConfigError(f'--clip_group_size={config.clip_group_size} must be >= 1 and divide '
                      f'--batch_size={config.batch_size}')
  if config.mech == 'dpsgd' and config.clip_group_size > 1 and config.sampling == 'poisson':
    # Groups are consecutive rows of a sampled batch: adding one example shifts every later
    # group, so one example can move the clipped sum by about 2C per group, not 2C.
    raise ConfigError(f'--clip_group_size={config.clip_group_size} cannot be used with '
                      '--sampling=poisson: one added example regroups every later example and '
                      'no sensitivity bound holds; use --sampling=shuffled (the paper\'s) or '
                      '--privacy_unit=patient for sound groups')
  if config.noise_seed < -1:
    raise ConfigError(f'--noise_seed must be >= 0 (or -1 for secret OS entropy), got {config.noise_seed}')
  if config.privacy_unit not in PRIVACY_UNITS:
    raise ConfigError(f'--privacy_unit must be {"|".join(PRIVACY_UNITS)}, got {config.privacy_unit!r}')
  if config.max_images_per_patient < 1:
    raise ConfigError(f'--max_images_per_patient must be >= 1, got {config.max_images_per_patient}')
  if config.microbatch_size % config.clip_group_size:
    raise ConfigError(f'--microbatch_size={config.microbatch_size} must be a multiple of '
                      f'--clip_group_size={config.clip_group_size}')
  if (config.mech == 'dpsgd' and config.sampling == 'shuffled' and config.microbatch_size
      and config.batch_size % config.microbatch_size):
    raise ConfigError(f'--microbatch_size={config.microbatch_size} must divide '
                      f'--batch_size={config.batch_size} with --sampling=shuffled (fixed-size '
                      'batches are processed in equal chunks)')
  if config.clipping_method not in CLIPPING_METHODS:
    raise ConfigError(f'--clipping_method must be {"|".join(CLIPPING_METHODS)}, got '
                      f'{config.clipping_method!r}')
  if config.clipping_method == 'ghost' and config.mech == 'dpsgd' and (
      config.clip_group_size > 1 or config.norm == 'batch_norm'):
    raise ConfigError('--clipping_method=ghost needs per-example units: use it with '
                      '--clip_group_size=1 and a norm other than batch_norm (or choose vmap)')
  if config.lr_schedule not in ('constant', 'plateau'):
    raise ConfigError(f'--lr_schedule must be constant|plateau, got {config.lr_schedule!r}')


def resolve_norm(norm: str, mech: str, pretrained: bool) -> str:
  """Trainable BatchNorm breaks DP-SGD; frozen ImageNet statistics or GroupNorm do not."""
  if norm != 'auto':
    return norm
  if mech == 'dpsgd':
    return 'frozen_bn' if pretrained else 'group_norm'
  return 'batch_norm'


def resolve_clipping_method(config, norm: str) -> str:
  """'ghost' where each clipped unit is one example of a DP-safe model, else 'vmap'.

  Both compute the same clipped sum; ghost clipping (`dpjax.ghost_clipping`) needs units of one
  example whose outputs do not mix, vmap handles the paper's groups and trainable BatchNorm.
  """
  if config.clipping_method != 'auto':
    return config.clipping_method
  return 'ghost' if config.clip_group_size == 1 and norm != 'batch_norm' else 'vmap'


def resolve_privacy_unit(config, has_patient_ids: bool, unparsed_names: int = 0) -> str:
  """The unit DP-SGD protects: 'patient' or 'image' ('image' for the other mechanisms).

  auto = 'patient' where the data name every image's patient and the sound protocol samples
  units by Poisson with per-unit clipping; otherwise 'image' (the guarantee then says that a
  patient with k images gets only the k-fold weaker group guarantee). An explicit 'patient'
  that cannot be honoured is an error, never a silent downgrade.
  """
  unit = config.privacy_unit
  if config.mech != 'dpsgd':
    if unit == 'patient':
      raise ConfigError(f'--privacy_unit=patient applies to --mech=dpsgd; --mech={config.mech} '
                        'protects each image (a patient with k images: k times its epsilon)')
    return 'image'
  if unit == 'auto':
    sound = (config.protocol == 'sound' and config.sampling == 'poisson'
             and config.clip_group_size == 1)
    unit = 'patient' if has_patient_ids and not unparsed_names and sound else 'image'
  if unit == 'patient':
    if not has_patient_ids:
      raise ConfigError(f'--privacy_unit=patient: the {config.dataset} data carry no patient ids; '
                        'use --privacy_unit=image')
    if config.sampling != 'poisson':
      raise ConfigError('--privacy_unit=patient needs --sampling=poisson (patients are sampled '
                        'whole, as units)')
    if config.clip_group_size > 1:
      raise ConfigError('--privacy_unit=patient clips each patient as one unit; it cannot be '
                        'combined with --clip_group_size > 1')
    if config.microbatch_size % config.max_images_per_patient:
      raise ConfigError(f'--microbatch_size={config.microbatch_size} must be a multiple of '
                        f'--max_images_per_patient={config.max_images_per_patient} (chunks hold '
                        'whole patients)')
  return unit


def check_target_is_private(config, num_units: int) -> None:
  """Refuses at once a target epsilon met with less noise than the calibration floor.

  Run before the data are prepared, on an estimate of the training units; `plan_privacy`
  checks again on the exact count.
  """
  if config.mech != 'dpsgd' or config.noise_multiplier or config.batch_size > num_units:
    return
  q = config.batch_size / num_units
  ledger = accounting.PrivacyLedger(config.sampling,
                                    shuffled_steps_per_epoch(config, num_units))
  ledger.record_steps(accounting.MIN_NOISE_MULTIPLIER, min(q, 1.0),
                      config.epochs * steps_per_epoch(config, num_units))
  target = config.epsilon or 1.0 / config.beta
  floor_epsilon = ledger.epsilon(config.delta, 'rdp' if config.protocol == 'paper' else config.accountant)
  if floor_epsilon <= target:
    raise _no_privacy_error(config, accounting.EssentiallyNoPrivacy(
        f'epsilon {target:g} at delta {config.delta:g} needs a noise multiplier below '
        f'{accounting.MIN_NOISE_MULTIPLIER:g} (epsilon there: {floor_epsilon:.3g}): essentially '
        'no privacy'))


def _no_privacy_error(config, error: Exception) -> ConfigError:
  asked = f'--epsilon={config.epsilon:g}' if config.epsilon else f'--beta={config.beta:g}'
  return ConfigError(f'{asked}: {error}; use --mech=none for a non-private baseline, or a '
                     'smaller epsilon')


def plan_privacy(config, num_units: int, privacy_unit: str = 'image') -> PrivacyPlan:
  """Calibrates the noise multiplier of DP-SGD to (1/beta or --epsilon, --delta).

  `num_units` counts the training split's privacy units (images, or patients), and
  --batch_size is the expected number of units per batch. The paper protocol calibrates as
  the paper did (Poisson sampling, per-example sensitivity, RDP); the ledger still charges
  what actually runs.
  """
  noun = 'patients' if privacy_unit == 'patient' else 'examples'
  if config.batch_size > num_units:
    raise ConfigError(f'--batch_size={config.batch_size} exceeds the {num_units} training {noun}')
  rows_per_unit = config.max_images_per_patient if privacy_unit == 'patient' else config.clip_group_size
  if config.mech != 'dpsgd':
    return PrivacyPlan(mech=config.mech, privacy_unit=privacy_unit, num_units=num_units)
  q = config.batch_size / num_units
  if config.sampling == 'poisson':
    q = sampling.exact_sampling_prob(q)  # What the sampler really draws with.
  steps = config.epochs * steps_per_epoch(config, num_units)
  target = config.epsilon or 1.0 / config.beta
  try:
    if config.noise_multiplier:
      z = float(config.noise_multiplier)
    elif config.protocol == 'paper':
      z = accounting.calibrate_noise_multiplier(
          target_epsilon=target, delta=config.delta, sampling_prob=q, steps=steps,
          accountant='rdp', sampling='poisson')
    else:
      z = accounting.calibrate_noise_multiplier(
          target_epsilon=target, delta=config.delta, sampling_prob=q, steps=steps,
          accountant=config.accountant, sampling=config.sampling,
          steps_per_epoch=shuffled_steps_per_epoch(config, num_units))
  except accounting.EssentiallyNoPrivacy as e:
    raise _no_privacy_error(config, e) from None
  # Every clipped unit (an example, a patient, or under shuffled sampling the paper's group,
  # whose 2C under replace-one the shuffled accounting charges) moves the sum by at most C.
  return PrivacyPlan(mech='dpsgd', privacy_unit=privacy_unit, rows_per_unit=rows_per_unit,
                     noise_multiplier=z, accounted_noise_multiplier=z, sampling_prob=q,
                     steps=steps, target_epsilon=None if config.noise_multiplier else target,
                     num_units=num_units)


def steps_per_epoch(config, num_train: int) -> int:
  if config.mech == 'dpsgd' and config.sampling == 'poisson':
    return max(1, round(num_train / config.batch_size))  # Expected passes: steps * q = epochs.
  return max(1, num_train // config.batch_size)  # Fixed-size batches, last partial one dropped.


def shuffled_steps_per_epoch(config, num_train: int) -> int | None:
  """What the shuffled-batch accounting needs to know of an epoch; None under Poisson."""
  return steps_per_epoch(config, num_train) if config.sampling == 'shuffled' else None


def make_optimizer(config, plan: PrivacyPlan, noise_key: jax.Array | None = None
                   ) -> optax.GradientTransformation:
  """SGD as in the paper; for DP-SGD the noise transformation comes first, on the clipped sum.

  The learning rate lives in the optimizer state (`inject_hyperparams`), so a plateau
  schedule can lower it between epochs without recompiling, and checkpoints keep it.
  """
  sgd = [optax.add_decayed_weights(config.weight_decay),
         optax.inject_hyperparams(optax.sgd)(learning_rate=config.learning_rate,
                                             momentum=config.momentum or None)]
  if plan.mech != 'dpsgd':
    return optax.chain(*sgd)
  # The noise is calibrated to one clipped unit (an example, a patient, or the paper's group of
  # examples) and the sum is divided by the expected number of such units.
  if noise_key is None:
    raise ValueError('DP-SGD needs the secret noise key (private_stream(private_key, NOISE))')
  noise = transforms.gaussian_noise(
      l2_norm_clip=config.l2_norm_clip, noise_multiplier=plan.noise_multiplier,
      key=noise_key, expected_batch_size=config.batch_size / config.clip_group_size)
  return optax.chain(noise, *sgd)


def learning_rate(opt_state) -> float:
  return float(opt_state[-1].hyperparams['learning_rate'])


def set_learning_rate(opt_state, value: float):
  """A copy of the optimizer state of `make_optimizer` with a new SGD learning rate."""
  *rest, sgd_state = opt_state
  hyperparams = dict(sgd_state.hyperparams)
  hyperparams['learning_rate'] = jnp.asarray(value, hyperparams['learning_rate'].dtype)
  return (*rest, sgd_state._replace(hyperparams=hyperparams))


@dataclasses.dataclass
class Plateau:
  """torch's ReduceLROnPlateau(mode='min', factor, patience, threshold=1e-4 relative), per epoch."""
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


def create_train_state(variables, tx, seed: int, private_key: jax.Array) -> TrainState:
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                    rng=stream_key(seed, _AUGMENT), private_key=private_key)


def prepare_images(images_uint8, ids, *, image_size, train, augment, key, ldp_fn, ldp_key=None,
                   stable_ids=None):
  """uint8 NHWC squares -> normalised float network input (on device, inside the step).

  Augmentation is public randomness keyed per example on `stable_ids` (a hash of the file's
  path), never on the batch row: adding a patient shifts every later row of a sampled batch,
  and row-keyed transforms would then change other examples' gradients too.
  """
  images = preprocess.to_unit_float(images_uint8)
  if ldp_fn is not None:
    images = ldp_fn(ldp_key, images, ids)
  if train and augment:
    images = preprocess.random_affine(key, images, image_size, example_ids=stable_ids)
  else:
    images = preprocess.center_crop(images, image_size)
  return preprocess.normalize(images)


GRAYSCALE_DATASETS = ('pneumonia',)  # X-rays: one grey value per pixel, stored as 3 equal channels.


def make_ldp_fn(config) -> Callable | None:
  """`ldp_fn(key, images, ids)`: the run's local-DP release of training images, or None.

  The key is the run's secret LDP stream, the same every epoch: one released noisy copy.
  """
  if config.mech != 'ldp':
    return None
  if config.ldp_variant == 'laplace':
    grayscale = config.dataset in GRAYSCALE_DATASETS
    return lambda key, images, ids: ldp.laplace_perturb(key, images, config.beta, ids,
                                                        grayscale=grayscale)
  perturb = ldp.PERTURBATIONS[config.ldp_variant]
  return lambda key, images, ids: perturb(key, images, config.beta, ids)


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _masked_sums(losses, correct, mask) -> dict[str, jax.Array]:
  """Loss and accuracy sums over the real (unpadded) examples of a batch."""
  return {'loss_sum': jnp.sum(jnp.where(mask, losses, 0.0)),
          'correct': jnp.sum(jnp.where(mask, correct, False)), 'count': jnp.sum(mask)}


def make_train_step(model, tx, config, plan: PrivacyPlan, norm: str, mesh,
                    canaries=None) -> Callable:
  """Returns the jitted `train_step(state, batch) -> (state, metrics)`.

  The batch is split across `mesh` along its example axis and the state is replicated; on
  one device this is plain `jax.jit`. `canaries` (DP-SGD audit only) are added to the clipped
  sum before the noise, each sampled like an example.

  `batch` holds `images` (uint8), `labels`, `ids` and a boolean `mask` marking real examples;
  the shapes are fixed for the whole run. Metrics are sums over real examples.
  """
  ldp_fn = make_ldp_fn(config)
  trains_bn = norm == 'batch_norm'
  clipping_method = resolve_clipping_method(config, norm)

  def forward(params, batch_stats, images):
    """Training-mode logits, and the running statistics (updated only by trainable BN)."""
    variables = {'params': params, 'batch_stats': batch_stats}
    if trains_bn:
      logits, updated = model.apply(variables, images, train=True, mutable=['batch_stats'])
      return logits, updated['batch_stats']
    return model.apply(variables, images, train=True), batch_stats

  def inputs(state, batch):
    key = jax.random.fold_in(state.rng, state.step)
    return prepare_images(batch['images'], batch['ids'], image_size=config.image_size,
                          train=True, augment=config.augment, key=key, ldp_fn=ldp_fn,
                          ldp_key=private_stream(state.private_key, LDP),
                          stable_ids=batch['stable_ids'])

  def dp_step(state, batch):
    images = inputs(state, batch)
    group = plan.rows_per_unit
    patients = plan.privacy_unit == 'patient'
    mask = batch['mask']

    def unit_loss(params, unit):
      # One clipped unit: a single example, a patient's image slots (the SUM of their losses,
      # so the patient's summed gradient is clipped), or the paper's group of examples (their
      # mean). Trainable BN (paper protocol only) uses the group's batch statistics: no DP.
      logits, new_stats = forward(params, state.batch_stats, unit['image'])
      losses = _cross_entropy(logits, unit['label'])
      real = 1 if patients else jnp.maximum(jnp.sum(unit['mask']), 1)
      loss = jnp.sum(jnp.where(unit['mask'], losses, 0.0)) / real
      correct = jnp.argmax(logits, -1) == unit['label']
      return loss, {'loss': losses, 'correct': correct, 'batch_stats': new_stats}

    def example_losses(params, examples):
      # Ghost clipping: the whole batch in one pass, one loss per example.
      logits, _ = forward(params, state.batch_stats, examples['image'])
      losses = _cross_entropy(logits, examples['label'])
      return losses, {'loss': losses, 'correct': jnp.argmax(logits, -1) == examples['label']}

    if clipping_method == 'ghost':
      examples = {'image': images, 'label': batch['labels']}
      grad_sum, stats, aux = ghost_clipping.ghost_clipped_grad_sum(
          example_losses, state.params, examples, mask, config.l2_norm_clip,
          microbatch_size=config.microbatch_size or None, group_size=group)
    else:
      units = jax.tree.map(lambda x: x.reshape(-1, group, *x.shape[1:]),
                           {'image': images, 'label': batch['labels'], 'mask': mask})
      grad_sum, stats, aux = clipping.clipped_grad_sum(
          unit_loss, state.params, units, jnp.any(units['mask'], axis=1), config.l2_norm_clip,
          microbatch_size=config.microbatch_size // group or None)
    if canaries is not None:
      grad_sum = run_audit.add_sampled_canaries(
          grad_sum, canaries, private_stream(state.private_key, CANARY), state.step,
          plan.sampling_prob, config.l2_norm_clip)
    updates, opt_state = tx.update(grad_sum, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    batch_stats = state.batch_stats
    if trains_bn:  # Mean of the groups' running-statistic updates.
      batch_stats = jax.tree.map(lambda x: jnp.mean(x, axis=0), aux['batch_stats'])
    # Statistics of private data outside the mechanism: reported as not covered.
    metrics = {**_masked_sums(aux['loss'].reshape(-1), aux['correct'].reshape(-1), mask),
               'units': stats.num_examples, 'num_clipped': stats.num_clipped,
               'sum_norms': stats.sum_norms}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              batch_stats=batch_stats)
    return new_state, metrics

  def plain_step(state, batch):
    images = inputs(state, batch)
    mask = batch['mask']
    count = jnp.maximum(jnp.sum(mask), 1)

    def batch_loss(params):
      logits, new_stats = forward(params, state.batch_stats, images)
      losses = _cross_entropy(logits, batch['labels'])
      loss = jnp.sum(jnp.where(mask, losses, 0.0)) / count
      return loss, (losses, logits, new_stats)

    (_, (losses, logits, new_stats)), grads = jax.value_and_grad(batch_loss, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = _masked_sums(losses, jnp.argmax(logits, -1) == batch['labels'], mask)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              batch_stats=new_stats)
    return new_state, metrics

  step = dp_step if plan.mech == 'dpsgd' else plain_step
  return jax.jit(step, donate_argnums=(0,),
                 in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                 out_shardings=parallel.replicated(mesh))


def make_eval_step(model, config, mesh) -> Callable:
  """Returns jitted `eval_step(params, batch_stats, batch) -> per-example (loss, probs)`."""

  def eval_step(params, batch_stats, batch):
    images = prepare_images(batch['images'], batch['ids'], image_size=config.image_size,
                            train=False, augment=False, key=None, ldp_fn=None, ldp_key=None)
    logits = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=False)
    return _cross_entropy(logits, batch['labels']), jax.nn.softmax(logits)

  replicated = parallel.replicated(mesh)
  return jax.jit(eval_step, in_shardings=(replicated, replicated, parallel.batch_sharded(mesh)),
                 out_shardings=replicated)


def evaluate(eval_step, params, batch_stats, split, batch_size: int, mesh) -> dict[str, np.ndarray]:
  """Per-example losses and class probabilities over a whole split, in fixed-shape batches."""
  n = len(split)
  losses, probs = [], []
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    batch = load_batch(split, np.pad(idx, (0, batch_size - len(idx)), mode='edge'),
                       np.arange(batch_size) < len(idx), mesh)
    loss, prob = eval_step(params, batch_stats, batch)
    losses.append(np.asarray(loss)[:len(idx)])
    probs.append(np.asarray(prob)[:len(idx)])
  return {'loss': np.concatenate(losses), 'probs': np.concatenate(probs),
          'labels': np.asarray(split.labels)}


def load_batch(split, indices: np.ndarray, mask: np.ndarray, mesh) -> dict[str, jax.Array]:
  """Gathers this process's rows of a global batch (uint8, by index) and shards it."""
  rows = parallel.local_rows(len(indices))
  local_indices = np.asarray(indices)[rows]
  images, labels, ids = split.gather(local_indices)
  local = {'images': images, 'labels': labels.astype(np.int32), 'ids': ids.astype(np.int32),
           'stable_ids': split.stable_ids[local_indices], 'mask': np.asarray(mask, bool)[rows]}
  return parallel.shard_batch(local, len(indices), mesh)


def summarize(evaluation: dict[str, np.ndarray]) -> dict[str, float]:
  predictions = evaluation['probs'].argmax(-1)
  return {'loss': float(evaluation['loss'].mean()),
          'accuracy': float((predictions == evaluation['labels']).mean())}


class TrainingDiverged(FloatingPointError):
  """The training loss stopped being finite: the run diverged (not bad input)."""


def check_finite(metrics: dict[str, float], step: int) -> None:
  if not math.isfinite(metrics['loss_sum']):
    raise TrainingDiverged(f'training diverged: non-finite training loss at step {step}; '
                           'lower --learning_rate (in a new --workdir)')
