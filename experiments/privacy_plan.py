"""What a run will do privately, decided before its first step: unit, noise, sampling rate.

`plan_privacy` calibrates the noise multiplier of DP-SGD to the target epsilon for the steps
the run will take, at exactly the sampling rate its sampler draws with; the ledger then charges
what actually ran.
"""

from __future__ import annotations

import dataclasses

from dpjax import accounting
from dpjax import models
from dpjax import sampling
from experiments.config_checks import ConfigError
from experiments.config_checks import check_noise_std


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


MAX_STEPS = 2**31 - 1


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
  try:
    floor_epsilon = ledger.epsilon(config.delta,
                                   'rdp' if config.protocol == 'paper' else config.accountant)
  except accounting.AccountingTooCostly as e:
    raise ConfigError(f'--accountant={config.accountant}: {e}') from None
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
  if steps >= MAX_STEPS:
    # The optimiser's int32 step count saturates there, and every later step would reuse the
    # last step's noise key.
    raise ConfigError(f'--epochs={config.epochs}: {steps} steps; at most {MAX_STEPS - 1} fit '
                      'the noise stream\'s step counter')
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
          steps_per_epoch=shuffled_steps_per_epoch(config, num_units),
          extra_gaussian_noise_multipliers=feature_stats_releases(config))
  except accounting.EssentiallyNoPrivacy as e:
    raise _no_privacy_error(config, e) from None
  except accounting.AccountingTooCostly as e:
    raise ConfigError(f'--accountant={config.accountant}: {e}') from None
  except ValueError as e:  # E.g. a delta no noise multiplier up to 2**30 reaches.
    raise ConfigError(f'--epsilon/--delta: {e}') from None
  asked = ('--noise_multiplier' if config.noise_multiplier
           else f'--epsilon={target:g} at --delta={config.delta:g}')
  check_noise_std(z, config.l2_norm_clip, asked)
  # Every clipped unit (an example, a patient, or under shuffled sampling the paper's group,
  # whose 2C under replace-one the shuffled accounting charges) moves the sum by at most C.
  return PrivacyPlan(mech='dpsgd', privacy_unit=privacy_unit, rows_per_unit=rows_per_unit,
                     noise_multiplier=z, accounted_noise_multiplier=z, sampling_prob=q,
                     steps=steps, target_epsilon=None if config.noise_multiplier else target,
                     num_units=num_units)


def feature_stats_releases(config) -> tuple[float, ...]:
  """Noise multipliers of the Gaussian releases a DP-SGD run makes before its steps: the
  ScatterNets' private feature statistics under --feature_norm=data_norm, else none."""
  if (config.mech == 'dpsgd' and config.feature_norm == 'data_norm'
      and config.arch in models.SCATTERNET_ARCHITECTURES):
    return (float(config.feature_stats_noise_multiplier),)
  return ()


def steps_per_epoch(config, num_train: int) -> int:
  if config.mech == 'dpsgd' and config.sampling == 'poisson':
    return max(1, round(num_train / config.batch_size))  # Expected passes: steps * q = epochs.
  return max(1, num_train // config.batch_size)  # Fixed-size batches, last partial one dropped.


def shuffled_steps_per_epoch(config, num_train: int) -> int | None:
  """What the shuffled-batch accounting needs to know of an epoch; None under Poisson."""
  return steps_per_epoch(config, num_train) if config.sampling == 'shuffled' else None
