"""What a run reports: the guarantee of what ran, the release, and what is not covered.

results.json splits `release` (the model and the metrics of the selected model on validation
and test data, covered by the guarantee) from `not_covered` (statistics computed from training
examples outside the mechanism); `release/release.json` is the publishable copy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dpjax import accounting
from dpjax import ldp
from dpjax import secret_keys
from experiments import steps
from experiments.privacy_plan import PrivacyPlan

DEMO_NOTE = 'SYNTHETIC DEMO DATA: these numbers say nothing about real medical images.'

# Shown after a private demo run of a network trained from scratch (no ImageNet weights): the
# model that does learn privately on the demo, with the README's measured 3-seed means.
SCATTERNET_DEMO_NOTE = (
    'from scratch on the demo, the model that learns privately is --arch=scatternet (scattering '
    'features + a DP linear head; measured, 3 seeds, test: {numbers}; README "Private models '
    'that learn")')
SCATTERNET_DEMO_NUMBERS = ('epsilon 1 per patient: balanced accuracy 0.80, ROC AUC 0.93; epsilon 8: ROC AUC '
                           '0.97, balanced accuracy 0.92 at the validation-chosen threshold')

NOT_COVERED_NOTE = ('Statistics computed from training examples outside the mechanism. They are '
                    'NOT covered by the privacy guarantee: do not publish them as private.')

RELEASE_NOTE = ('What the guarantee covers: the model (every parameter update of training) '
                'and what is computed from it and from validation/test data alone. '
                'Validation and test examples themselves are not protected.')

# Per-epoch fields of the history, by what they are computed from.
# Validation scores of the private model are post-processing (validation examples are not
# training data), so they are released; training statistics are not covered.
_RELEASED_HISTORY = ('epoch', 'step', 'learning_rate', 'val_loss', 'val_accuracy',
                     'val_balanced_accuracy', 'val_roc_auc', 'val_quadratic_weighted_kappa',
                     'epsilon')


def private_randomness_summary(config) -> dict[str, Any]:
  """Where the noise and sampling came from, and what that means for the guarantee."""
  if config.noise_seed < 0:
    return {'source': 'os_entropy', 'generator': f'JAX {secret_keys.KEY_IMPL}, 64-bit key',
            'note': 'drawn from OS entropy for this run; kept only in its (private) checkpoints'}
  return {'source': 'noise_seed', 'generator': f'JAX {secret_keys.KEY_IMPL}, 64-bit key',
          'note': (f'reproducible from --noise_seed={config.noise_seed}: NO guarantee against '
                   'anyone who knows it')}


def _seed_warning(config) -> str:
  # The reproducible key is derived from --noise_seed and the run's settings, and both are in
  # the published config: every reader of release.json can regenerate the noise and sampling.
  return (f'NO guarantee against anyone who knows --noise_seed={config.noise_seed}, which the '
          'published config contains (the noise and sampling can be regenerated); only if the '
          'seed and config were kept secret (and the seed could not be guessed): ') \
      if config.noise_seed >= 0 else ''


# Every epsilon-valued field of a summary, the conditional ones of the paper protocol too.
_EPSILON_FIELDS = ('epsilon', 'epsilon_pld', 'epsilon_rdp', 'epsilon_if_batchnorm_were_frozen',
                   'epsilon_claimed_by_paper_method')


def _voided(report: dict[str, Any], fields) -> dict[str, Any]:
  """`report` with each finite epsilon of `fields` made infinite, its value kept apart."""
  voided = {**report}
  for field in fields:
    value = report.get(field)
    if isinstance(value, (int, float)) and math.isfinite(value):
      voided[field], voided[f'{field}_if_seed_secret'] = float('inf'), value
  return voided


def _void_if_seed_public(config, summary: dict[str, Any]) -> dict[str, Any]:
  """With --noise_seed every released epsilon is infinite; the conditional values are kept
  apart, named `<field>_if_seed_secret` (LDP: in `ldp` as well). Also when the headline epsilon
  is already infinite (BatchNorm in training mode): the paper protocol's conditional epsilons
  would otherwise stay finite."""
  if config.noise_seed < 0 or summary.get('epsilon') is None:
    return summary
  voided = _voided(summary, _EPSILON_FIELDS)
  if 'ldp' in summary:
    voided['ldp'] = _voided(summary['ldp'], ('per_pixel_epsilon', 'per_image_epsilon'))
  return voided


def privacy_summary(config, plan: PrivacyPlan, ledger, data) -> dict[str, Any]:
  """The guarantee of what actually ran, with its delta, neighbouring relation and unit."""
  unit = plan.privacy_unit
  base = {'privacy_unit': unit, 'private_randomness': private_randomness_summary(config)}
  if config.mech == 'none':
    return {**base, 'privacy_unit': None, 'epsilon': None, 'delta': None,
            'guarantee': 'none (non-private baseline)'}
  if config.mech == 'ldp':
    grayscale = config.ldp_variant == 'laplace' and config.dataset in steps.GRAYSCALE_DATASETS
    report = ldp.ldp_epsilon_report(config.beta, (data.prep_size, data.prep_size, 3),
                                    variant=config.ldp_variant, grayscale=grayscale)
    per_image = report['per_image_epsilon']  # None: no image-level guarantee at all.
    guarantee = ldp.format_ldp_epsilon(report)
    if data.train.patients is not None and per_image is not None:
      report['per_patient_epsilon'] = f'k * {per_image:g} for a patient with k images'
      guarantee += f'; k * {per_image:g} per patient with k images'
    return _void_if_seed_public(config, {
        **base, 'epsilon': float('inf') if per_image is None else per_image, 'delta': 0.0,
        'neighbouring_relation': report['per_image_relation'],
        'guarantee': _seed_warning(config) + guarantee, 'ldp': report})
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
                    'the not_covered statistics; the number of training units is treated as '
                    'public (it is published); validation and test examples are not protected')}
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
  return _void_if_seed_public(config, summary)


def split_history(epochs: list[dict[str, Any]],
                  seed_public: bool = False) -> tuple[list[dict], list[dict]]:
  """Per-epoch records -> (released part, not-covered part), both keyed by epoch.

  With ``seed_public`` (a --noise_seed run) the epsilon spent so far is released as
  `epsilon_if_seed_secret`, never as an epsilon.
  """
  released = [{('epsilon_if_seed_secret' if seed_public and k == 'epsilon' else k): e[k]
               for k in _RELEASED_HISTORY if k in e} for e in epochs]
  uncovered = [{'epoch': e['epoch'], **{k: v for k, v in e.items() if k not in _RELEASED_HISTORY}}
               for e in epochs]
  return released, uncovered


def export_model(workdir: Path, params, batch_stats) -> str:
  """Writes the selected model (no optimizer state, no keys) as the public artifact."""
  from flax import serialization  # Deferred: only needed at the very end.
  path = workdir / 'release' / 'model.msgpack'
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.tmp')
  tmp.write_bytes(serialization.msgpack_serialize(
      jax.tree.map(np.asarray, {'params': params, 'batch_stats': batch_stats})))
  tmp.replace(path)
  return str(path.relative_to(workdir))


# Kept in results.json (the private record) but not in the publishable copy: the data
# fingerprint hashes every training file's name, size and time, so with and without one patient
# it differs (certain membership inference); the wall time depends on the realised batch sizes.
PRIVATE_ONLY = ('not_covered', 'data_fingerprint', 'wall_time_s')


def public_release(results: dict[str, Any]) -> dict[str, Any]:
  """What may be published beside the model: results without `PRIVATE_ONLY`."""
  return {k: v for k, v in results.items() if k not in PRIVATE_ONLY}


def _asked(results: dict[str, Any]) -> str:
  """What the run was asked for: a target epsilon where one was given, else beta."""
  config = results.get('config', {})
  if results['mech'] == 'dpsgd' and config.get('epsilon'):
    return f'target epsilon {config["epsilon"]:g}'
  return f'beta={results["beta"]:g}'


def _scores(report: dict[str, Any]) -> str:
  """Accuracy, balanced accuracy and the threshold-free score of one split's report."""
  ranked = (f'ROC AUC {report["roc_auc"]:.4f}' if 'roc_auc' in report
            else f'QW kappa {report["quadratic_weighted_kappa"]:.4f}')
  return (f'accuracy {report["accuracy"]:.4f}, balanced {report["balanced_accuracy"]:.4f}, '
          f'{ranked}')


def summary_lines(results: dict[str, Any]) -> list[str]:
  """The final human-readable summary of a run."""
  release, uncovered = results['release'], results['not_covered']
  lines = []
  if results.get('reused'):
    lines.append(f'reused the finished run in {results["workdir"]} (same settings and data); '
                 'delete its results.json to recompute')
  lines += [f'{results["dataset"]} / {results["mech"]} ({_asked(results)}): '
           f'test {_scores(release["test_metrics"])}  '
           f'(majority baseline {release["majority_baseline"]:.4f}); '
           f'val accuracy {release["val_accuracy"]:.4f}']
  point = release.get('operating_point')
  if point:
    at = point['test']
    lines.append(f'at the validation-chosen threshold {point["threshold"]:.3g}: test accuracy '
                 f'{at["accuracy"]:.4f}, balanced {at["balanced_accuracy"]:.4f}, sensitivity '
                 f'{at["sensitivity"]:.4f}, specificity {at["specificity"]:.4f}')
  lines += [f'train {uncovered["train_accuracy"]:.4f} (not covered: a statistic of the training '
            'data outside the mechanism)',
            f'privacy: {results["guarantee"]}',
            f'privacy unit: {results["privacy_unit"]}',
            f'model selected at epoch {release["best_epoch"]} by {release["selection"]}; '
            f'pretrained={results["pretrained"]}',
            f'results: {Path(results["workdir"]) / "results.json"}']
  config = results.get('config', {})
  if (results['data'] == 'demo' and results['mech'] == 'dpsgd' and not results['pretrained']
      and config.get('arch') not in ('scatternet', 'scatternet_cnn')):
    lines.append(SCATTERNET_DEMO_NOTE.format(numbers=SCATTERNET_DEMO_NUMBERS))
  if results.get('data_note'):
    lines.append(results['data_note'])
  return lines
