"""Checks of a run's configuration: every value that cannot run is refused in one line.

`validate_config` checks the fields one by one (errors name the flag); the `resolve_*`
functions turn the `auto` choices into what the run will do, refusing combinations that would
void the guarantee (trainable BatchNorm under DP-SGD, clip groups under Poisson sampling,
patient units that cannot be sampled whole).
"""

from __future__ import annotations

import math

from dpjax import accounting
from dpjax import ldp
from dpjax import models
from dpjax.data import datasets
from dpjax.errors import UserInputError
from experiments.configs.default import RECIPES

IMAGENET_ARCH = 'resnet18'  # The only architecture with ImageNet weights (torchvision's file).

MECHANISMS = ('none', 'ldp', 'dpsgd')
PROTOCOLS = ('sound', 'paper')
CLIPPING_METHODS = ('auto', 'ghost', 'vmap')
PRIVACY_UNITS = ('auto', 'patient', 'image')
LR_SCHEDULES = ('constant', 'plateau')
COMPUTE_DTYPES = ('float32', 'bfloat16')
AVERAGING = ('none', 'ema', 'polyak')
SELECTIONS = ('auto', 'val_loss', 'val_auc', 'val_balanced_accuracy', 'val_kappa', 'last')


class ConfigError(UserInputError):
  """A configuration value that cannot run; the message names the flag."""


def check_selection_fits(selection: str, num_classes: int) -> None:
  """ROC AUC ranks two classes; kappa weighs ordered grades (APTOS has five)."""
  if selection == 'val_auc' and num_classes != 2:
    raise ConfigError('--selection=val_auc needs two classes; use val_kappa for DR grades')
  if selection == 'val_kappa' and num_classes == 2:
    raise ConfigError('--selection=val_kappa is for DR grades; use val_auc for two classes')


def validate_config(config) -> None:
  """Raises ConfigError naming the flag for any value that cannot run."""
  _check_urls(config)
  for name, choices in (('dataset', datasets.DATASETS), ('mech', MECHANISMS),
                        ('protocol', PROTOCOLS), ('sampling', accounting.SAMPLINGS),
                        ('accountant', accounting.ACCOUNTANTS), ('ldp_variant', ldp.VARIANTS),
                        ('norm', ('auto', *models.NORMS)), ('clipping_method', CLIPPING_METHODS),
                        ('privacy_unit', PRIVACY_UNITS), ('lr_schedule', LR_SCHEDULES),
                        ('compute_dtype', COMPUTE_DTYPES), ('recipe', RECIPES),
                        ('trainable', models.TRAINABLE), ('averaging', AVERAGING),
                        ('selection', SELECTIONS),
                        ('arch', tuple(models.ARCHITECTURES))):
    if config[name] not in choices:
      raise ConfigError(f'--{name} must be one of {"|".join(choices)}, got {config[name]!r}')
  check_selection_fits(config.selection, 2 if config.dataset == 'pneumonia' else 5)
  if config.arch in models.SCATTERNET_ARCHITECTURES:
    if config.weights != 'none':
      raise ConfigError(f'--arch={config.arch} has no pretrained weights (its scattering is fixed '
                        'and its head is trained from scratch): pass --weights=none')
    if config.trainable == 'last_stage' and config.arch == 'scatternet':
      raise ConfigError('--trainable=last_stage: --arch=scatternet is one linear layer; use '
                        '--trainable=all')
    if config.norm == 'batch_norm':
      raise ConfigError(f'--norm=batch_norm: --arch={config.arch} uses group_norm (its models '
                        'are the same private or not)')
    if config.feature_norm not in ('group_norm', 'data_norm'):
      raise ConfigError(f'--feature_norm must be one of group_norm|data_norm, got '
                        f'{config.feature_norm!r}')
    if config.feature_norm == 'data_norm' and config.protocol == 'paper':
      raise ConfigError('--feature_norm=data_norm with --protocol=paper: the paper\'s method '
                        'has no account of the statistics release; use group_norm')
    if config.feature_norm == 'data_norm' and config.mech == 'ldp':
      raise ConfigError('--feature_norm=data_norm with --mech=ldp: the statistics would come '
                        'from the raw images, outside the local-DP release; use group_norm')
    if config.feature_norm == 'data_norm' and config.mech == 'dpsgd' and not (
        config.feature_stats_noise_multiplier > 0 and config.feature_stats_clip > 0
        and math.isfinite(config.feature_stats_noise_multiplier)
        and math.isfinite(config.feature_stats_clip)):
      raise ConfigError('--feature_stats_noise_multiplier and --feature_stats_clip must be '
                        f'finite and > 0, got {config.feature_stats_noise_multiplier} and '
                        f'{config.feature_stats_clip}')
  if config.weights == 'imagenet' and config.arch != IMAGENET_ARCH:
    # Refused before any download, online or not, so one command behaves the same everywhere.
    raise ConfigError(f'--arch={config.arch}: the ImageNet weights are torchvision\'s '
                      f'{IMAGENET_ARCH}; pass --weights=none to train {config.arch} from scratch')
  if not (config.beta > 0 and math.isfinite(config.beta)):
    raise ConfigError(f'--beta must be a positive number, got {config.beta}')
  positive_ints = ('epochs', 'batch_size', 'image_size', 'eval_batch_size')
  for name in positive_ints:
    if int(getattr(config, name)) <= 0:
      raise ConfigError(f'--{name} must be a positive integer, got {getattr(config, name)}')
  if config.epochs > MAX_EPOCHS:
    raise ConfigError(f'--epochs={config.epochs}: at most {MAX_EPOCHS} (each epoch keeps a '
                      'history record, in memory and in every checkpoint, and saves a checkpoint, '
                      'whose bookkeeping memory grows with every save)')
  if config.coordinator_address:
    host, _, port = config.coordinator_address.rpartition(':')
    if not host or not port.isdigit():
      raise ConfigError(f'--coordinator_address must be HOST:PORT, got {config.coordinator_address!r}')
    if config.num_processes < 1 or not 0 <= config.process_id < config.num_processes:
      raise ConfigError(f'--coordinator_address needs --num_processes >= 1 and 0 <= --process_id < '
                        f'--num_processes, got {config.num_processes} and {config.process_id}')
  if config.augmult < 1:
    raise ConfigError(f'--augmult must be >= 1, got {config.augmult}')
  if config.augmult > 1 and not config.augment:
    raise ConfigError(f'--augmult={config.augmult} averages augmented views: it needs --augment=true')
  if not 0 <= config.ema_decay < 1:
    raise ConfigError(f'--ema_decay must be in [0, 1), got {config.ema_decay}')
  if config.heartbeat_timeout_s < 1:
    raise ConfigError(f'--heartbeat_timeout_s must be >= 1, got {config.heartbeat_timeout_s}')
  if config.image_size < 32:
    raise ConfigError(f'--image_size must be >= 32 for ResNet-18, got {config.image_size}')
  if config.microbatch_size < 0:
    raise ConfigError(f'--microbatch_size must be >= 0, got {config.microbatch_size}')
  if not 0 < config.delta < 1:
    raise ConfigError(f'--delta must be in (0, 1), got {config.delta}')
  if config.noise_multiplier < 0:
    raise ConfigError(f'--noise_multiplier must be >= 0, got {config.noise_multiplier}')
  if not math.isfinite(config.noise_multiplier):
    raise ConfigError(f'--noise_multiplier must be a finite number, got {config.noise_multiplier}')
  if config.mech == 'dpsgd' and 0 < config.noise_multiplier < accounting.MIN_NOISE_MULTIPLIER:
    # Calibration's floor, for the same reason; below about 1e-3 the PLD accountant also
    # needs more memory than any machine has.
    raise ConfigError(f'--noise_multiplier={config.noise_multiplier:g} is below '
                      f'{accounting.MIN_NOISE_MULTIPLIER:g}: essentially no privacy; use '
                      '--mech=none for a non-private baseline')
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
  if not 0 <= config.split_seed < SEED_LIMIT:
    raise ConfigError(f'--split_seed must be in [0, 2**32), got {config.split_seed}')
  if not 0 <= config.seed < SEED_LIMIT:
    raise ConfigError(f'--seed must be in [0, 2**32), got {config.seed}')
  if not -1 <= config.noise_seed < SEED_LIMIT:
    raise ConfigError(f'--noise_seed must be in [0, 2**32) (or -1 for secret OS entropy), got '
                      f'{config.noise_seed}')
  _check_numbers(config)
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
  if config.clipping_method == 'ghost' and config.mech == 'dpsgd' and (
      config.clip_group_size > 1 or config.norm == 'batch_norm'):
    raise ConfigError('--clipping_method=ghost needs per-example units: use it with '
                      '--clip_group_size=1 and a norm other than batch_norm (or choose vmap)')


PATH_FIELDS = ('data_dir', 'cache_dir', 'workdir', 'weights')


def _check_urls(config) -> None:
  """A path given as a URL must be one that etils.epath opens (gs://, s3://, az://, hf://);
  whether it exists is checked when `experiments.remote_paths` copies it (no request here)."""
  from experiments import remote_paths  # Deferred: it imports this module.
  for name in PATH_FIELDS:
    value = str(config.get(name, '') or '') if hasattr(config, 'get') else ''
    if remote_paths.is_url(value):
      remote_paths.check_url(value, f'--{name}')


# JAX seeds are 32-bit words in practice: a larger --seed would overflow deep inside JAX.
SEED_LIMIT = 2**32

# Anything that grows with a flag is bounded up front. Per epoch a run keeps a history record
# (in memory, in every checkpoint, in results.json) and saves a checkpoint; each save leaves
# about 0.25 MB with orbax/TensorStore that is never freed (measured on CPU). --epochs=1000000
# once grew to 22.7 GB and was killed by the kernel without a word.
MAX_EPOCHS = 10_000
MAX_CHECKPOINT_SAVES = 20_000


def check_checkpoint_saves(config, steps_per_epoch: int) -> None:
  """Refuses (one line) a run that would save more than MAX_CHECKPOINT_SAVES checkpoints."""
  total_steps = config.epochs * steps_per_epoch
  saves = config.epochs + (total_steps // config.checkpoint_every_steps
                           if config.checkpoint_every_steps > 0 else 0)
  if saves > MAX_CHECKPOINT_SAVES:
    raise ConfigError(f'--checkpoint_every_steps={config.checkpoint_every_steps} with '
                      f'--epochs={config.epochs}: {saves} checkpoint saves over {total_steps} steps '
                      f'(at most {MAX_CHECKPOINT_SAVES}); checkpoint less often')
# Beyond this noise std (z * C) every update is noise and float32 training overflows; such a
# run could only release a random model, so it is refused with the reason instead.
MAX_NOISE_STD = 1e6


def _check_numbers(config) -> None:
  """Ranges of the optimiser and privacy numbers, before any data are prepared (NaN fails every
  comparison, so each check is written to fail on it)."""
  if not (config.learning_rate > 0 and math.isfinite(config.learning_rate)):
    raise ConfigError(f'--learning_rate must be a finite number > 0, got {config.learning_rate}')
  if not 0 <= config.momentum < 1:
    raise ConfigError(f'--momentum must be in [0, 1), got {config.momentum}')
  if not (config.weight_decay >= 0 and math.isfinite(config.weight_decay)):
    raise ConfigError(f'--weight_decay must be a finite number >= 0, got {config.weight_decay}')
  if not (config.epsilon >= 0 and math.isfinite(config.epsilon)):
    raise ConfigError(f'--epsilon must be a finite number > 0 (or 0 for 1/beta), got '
                      f'{config.epsilon}')
  if not (config.l2_norm_clip > 0 and math.isfinite(config.l2_norm_clip)):
    raise ConfigError(f'--l2_norm_clip must be a finite number > 0, got {config.l2_norm_clip}')
  check_noise_std(config.noise_multiplier, config.l2_norm_clip, '--noise_multiplier')
  if config.audit and config.audit_canaries < 1:
    raise ConfigError(f'--audit_canaries must be >= 1 with --audit=true, got '
                      f'{config.audit_canaries}')


def check_noise_std(noise_multiplier: float, l2_norm_clip: float, asked: str) -> None:
  """Refuses noise so large that training can only diverge or release a random model."""
  if noise_multiplier * l2_norm_clip > MAX_NOISE_STD:
    raise ConfigError(
        f'{asked}: noise std z*C = {noise_multiplier * l2_norm_clip:.3g} exceeds '
        f'{MAX_NOISE_STD:g}: every update would be noise (float32 training overflows); ask for a '
        'larger epsilon or delta, or a smaller noise multiplier')


def resolve_norm(norm: str, mech: str, pretrained: bool, arch: str = IMAGENET_ARCH) -> str:
  """Trainable BatchNorm breaks DP-SGD; frozen ImageNet statistics or GroupNorm do not.

  The ScatterNets use GroupNorm in every run, private or not, so that the private and the
  non-private models of one arch are the same model.
  """
  if norm != 'auto':
    return norm
  if arch in models.SCATTERNET_ARCHITECTURES:
    return models.GROUP_NORM
  if mech == 'dpsgd':
    return models.FROZEN_BN if pretrained else models.GROUP_NORM
  return models.BATCH_NORM


def resolve_clipping_method(config, norm: str) -> str:
  """'ghost' where each clipped unit is one example of a DP-safe model, else 'vmap'.

  Both compute the same clipped sum; ghost clipping (`dpjax.ghost_clipping`) needs units of one
  example whose outputs do not mix, vmap handles the paper's groups and trainable BatchNorm.
  """
  if config.clipping_method != 'auto':
    return config.clipping_method
  return 'ghost' if config.clip_group_size == 1 and norm != models.BATCH_NORM else 'vmap'


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
