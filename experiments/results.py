"""What a run reports: the guarantee of what ran, the release, and what is not covered.

results.json splits `release` (the model and the metrics of the selected model on validation
and test data, covered by the guarantee) from `not_covered` (statistics computed from training
examples outside the mechanism); `release/release.json` is the publishable copy.
"""

from __future__ import annotations

import fnmatch
import math
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dpjax import accounting
from dpjax import ldp
from dpjax import secret_keys
from experiments import audit as audit_lib
from experiments import steps
from experiments.privacy_plan import PrivacyPlan

DEMO_NOTE = 'SYNTHETIC DEMO DATA: these numbers say nothing about real medical images.'

# Shown after a private demo run of a network trained from scratch (no ImageNet weights): the
# model that does learn privately on the demo, with the README's measured means.
SCATTERNET_DEMO_NOTE = (
    'from scratch on the demo, the model that learns privately is --arch=scatternet (scattering '
    'features + a DP linear head; measured, test, 9 runs (seeds 0-2, three times): {numbers}; '
    'README "Private models that learn")')
SCATTERNET_DEMO_NUMBERS = ('epsilon 1 per patient: ROC AUC 0.92, balanced accuracy 0.84 (0.85 at the '
                           'validation-chosen threshold); epsilon 8: ROC AUC 0.97, balanced '
                           'accuracy 0.91 (0.92)')

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


# APTOS's images are eyes, and its id_codes name no patient: a patient with both eyes in the
# data contributes two images, so an image-level guarantee covers that patient only twice over.
APTOS_EYES_NOTE = 'APTOS images are eyes, two per patient with both eyes in the data'


def _aptos_per_patient(config, epsilon: float, delta: float) -> str:
  """The group-privacy guarantee of a patient with both eyes (k = 2): (2 eps, (1 + e^eps) delta)."""
  if config.dataset != 'aptos':
    return ''
  if delta:
    return (f'; {APTOS_EYES_NOTE}: per patient only ({2 * epsilon:.3g}, '
            f'{(1 + math.exp(min(epsilon, 700.0))) * delta:.3g})-DP (group privacy, 2x epsilon)')
  return f'; {APTOS_EYES_NOTE}: per patient only {2 * epsilon:g} (group privacy, 2x epsilon)'


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
_EPSILON_FIELDS = ('epsilon', 'epsilon_pld', 'epsilon_rdp', 'epsilon_replace_one',
                   'epsilon_if_batchnorm_were_frozen', 'epsilon_claimed_by_paper_method')


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
    if per_image is not None:
      guarantee += _aptos_per_patient(config, per_image, 0.0)
    return _void_if_seed_public(config, {
        **base, 'epsilon': float('inf') if per_image is None else per_image, 'delta': 0.0,
        'neighbouring_relation': report['per_image_relation'],
        'guarantee': _seed_warning(config) + guarantee, 'ldp': report})
  eps = ledger.epsilons(config.delta)
  who = ("each patient's images (neighbouring data sets add or remove one patient with all "
         'their images)' if unit == 'patient' else
         f'each training image ({ledger.neighbouring_relation})')
  if unit == 'patient' and data.patients['unparsed_file_names']:
    # No count: the guarantee is published, and whether one patient's files carry a name
    # would move it.
    who += ' (patients as identified by file names; unnamed files count as their own patients)'
  if unit == 'image' and data.train.patients is not None:
    who += '; a patient with k images gets only the k-fold weaker group guarantee'
  # The number of units is published and sets q, the steps and the noise: neighbours of
  # another count are told apart by it, so what holds with it known is replace-one (neighbours
  # of the same count), printed beside the add/remove epsilon.
  eps_replace, replace_method = ledger.replace_one_epsilon(config.delta, config.accountant)
  known = '' if ledger.neighbouring_relation == 'replace_one' else (
      f'; ({eps_replace:.3g}, {config.delta:g})-DP for one {unit} replaced by another '
      '(replace-one), which is what holds against whoever knows the number of training units: '
      'it is published, and the sampling rate, steps and noise derive from it')
  summary = {**base,
      'epsilon': eps[config.accountant], 'epsilon_pld': eps['pld'], 'epsilon_rdp': eps['rdp'],
      'epsilon_replace_one': eps_replace, 'replace_one_method': replace_method,
      'delta': config.delta, 'accountant': config.accountant,
      'neighbouring_relation': ledger.neighbouring_relation,
      'noise_multiplier': plan.noise_multiplier,
      'accounted_noise_multiplier': plan.accounted_noise_multiplier,
      'sampling_prob': plan.sampling_prob, 'sampling': config.sampling, 'steps': ledger.num_steps,
      'clip_group_size': config.clip_group_size, 'target_epsilon': plan.target_epsilon,
      'l2_norm_clip': config.l2_norm_clip, 'privacy_units_in_train': plan.num_units,
      'guarantee': (f'{_seed_warning(config)}({eps[config.accountant]:.3g}, {config.delta:g})-DP '
                    f'for {who}, {config.accountant.upper()} accountant{known}; covers the '
                    'model, not the not_covered statistics; validation and test examples are '
                    'not protected'
                    f'{_aptos_per_patient(config, eps[config.accountant], config.delta)}')}
  if config.protocol == 'paper':
    # What the paper would have printed: Poisson sampling and per-example sensitivity assumed.
    claimed = accounting.PrivacyLedger(sampling='poisson')
    claimed.record_steps(plan.noise_multiplier, plan.sampling_prob, ledger.num_steps)
    summary['epsilon_claimed_by_paper_method'] = claimed.epsilon(config.delta, 'rdp')
  if config.norm == 'batch_norm':
    summary.update(
        epsilon=float('inf'), epsilon_if_batchnorm_were_frozen=summary['epsilon'],
        epsilon_replace_one=float('inf'), epsilon_pld=float('inf'), epsilon_rdp=float('inf'),
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


# Kept in results.json (the curator's record) but not in the publishable copy, and why.
PRIVATE_FIELDS = {
    'not_covered': 'statistics of training examples computed outside the mechanism',
    'data_fingerprint': ("a hash (keyed with the workdir's secret salt) of every training "
                         "file's name and bytes: with and without one patient it differs "
                         '(certain membership inference for whoever holds the salt)'),
    'wall_time_s': 'depends on the realised batch sizes, hence on the training data',
    'split_sizes': ('images per split: the train count moves with one patient added or removed, '
                    "and with one replaced it still tells the replaced patient's number of films"),
    'split_patients': ('patients per split: with the image as the unit, one image replaced can '
                       'add or remove a patient; with the patient as the unit the train count '
                       'is privacy_units_in_train'),
}
PRIVATE_ONLY = tuple(PRIVATE_FIELDS)

# Fields of the release that are functions of the number of training units n (and of the
# public settings), so that they differ between a data set and the same data set with one unit
# added or removed. They are published: the guarantee that holds with n known is the
# replace-one epsilon (neighbours of the same n), printed beside the add/remove one. Patterns
# over flattened paths (`a.b`, `[]` for a list item), each with why it may be published.
PUBLISHED_PUBLIC_FIELDS = {
    'privacy_units_in_train': ('n, the number of training units (patients or images); '
                               'epsilon_replace_one is the guarantee with it known'),
    'sampling_prob': 'q = batch_size / n',
    'steps': 'the steps taken: epochs x round(n / batch_size) (Poisson)',
    'noise_multiplier': 'calibrated to the target epsilon at q and the steps: a function of n',
    'accounted_noise_multiplier': 'as noise_multiplier',
    'privacy_ledger.*': 'the (noise multiplier, q, count) runs of the steps taken: functions of n',
    'epsilon*': ("every epsilon (add/remove, PLD, RDP, replace-one, and the conditional "
                 '*_if_seed_secret, *_if_batchnorm_were_frozen values): the accountants\' '
                 'epsilon of q, the steps and the noise'),
    'replace_one_method': 'which bound the replace-one epsilon is: chosen from q, steps and noise',
    'guarantee': 'the sentence that states the epsilons above',
    'release.covered_by': 'the guarantee sentence',
    'release.history[].step': "the steps taken by each epoch's end",
    'release.history[].epsilon*': "the epsilon spent by each epoch's end",
}

# Fields of the release computed from the private models and validation or test data alone:
# covered by the guarantee (post-processing), and expected to differ between neighbours.
RELEASED_MODEL_FIELDS = {
    'release.best_epoch': "the epoch whose model's validation score was best",
    'release.val_*': 'validation metrics of the released model',
    'release.test_*': 'test metrics of the released model',
    'release.operating_point.*': 'a threshold chosen on validation, and metrics at it',
    'release.history[].val_*': "validation metrics of each epoch's model",
    'release.history[].learning_rate': "the plateau schedule follows each epoch's validation loss",
    'release.audit.*': 'the canary audit scores the released parameters',
}


def _flatten(value: Any, path: str = '') -> dict[str, Any]:
  """{'a.b[0].c': leaf} of nested dicts and lists."""
  if isinstance(value, dict) and value:
    return {k: v for key, item in value.items()
            for k, v in _flatten(item, f'{path}.{key}' if path else str(key)).items()}
  if isinstance(value, list) and value:
    return {k: v for i, item in enumerate(value)
            for k, v in _flatten(item, f'{path}[{i}]').items()}
  return {path: value}


def release_differences(first: dict[str, Any], second: dict[str, Any]) -> list[str]:
  """Paths (list items as `[]`) where two release.json documents differ, each once."""
  a, b = _flatten(first), _flatten(second)
  missing = object()
  return sorted({re.sub(r'\[\d+\]', '[]', path) for path in set(a) | set(b)
                 if a.get(path, missing) != b.get(path, missing)})


def undeclared_differences(first: dict[str, Any], second: dict[str, Any]) -> list[str]:
  """Differences between two releases that are neither the model and its metrics
  (`RELEASED_MODEL_FIELDS`) nor declared public (`PUBLISHED_PUBLIC_FIELDS`): each one
  would tell the two data sets apart outside the guarantee."""
  declared = (*PUBLISHED_PUBLIC_FIELDS, *RELEASED_MODEL_FIELDS)
  return [path for path in release_differences(first, second)
          if not any(fnmatch.fnmatchcase(path, pattern) for pattern in declared)]


def disclosure() -> dict[str, Any]:
  """What each kind of field of results.json is, for whoever decides what to publish."""
  return {
      'public_inputs': ('config (with batch_size, epochs, delta, the target epsilon, the clip '
                        'norm, the accountant, the seeds), dataset, mech, beta, epochs: chosen by '
                        'the curator; published'),
      'published_counts': PUBLISHED_PUBLIC_FIELDS,
      'private_counts': PRIVATE_FIELDS,
      'release': 'release/release.json is results.json without the private_counts fields',
  }


def public_release(results: dict[str, Any]) -> dict[str, Any]:
  """What may be published beside the model: results without `PRIVATE_ONLY`."""
  return {k: v for k, v in results.items() if k not in PRIVATE_ONLY}


def _asked(results: dict[str, Any]) -> str:
  """What set the noise: a fixed noise multiplier, a target epsilon (--epsilon, or 1/beta for
  DP-SGD), or beta (LDP's Laplace scale). A default beta=1 beside an --epsilon=8 run misleads."""
  config = results.get('config', {})
  if results['mech'] == 'dpsgd':
    if config.get('noise_multiplier'):
      return f'noise multiplier {config["noise_multiplier"]:g}, fixed'
    if config.get('epsilon'):
      return f'target epsilon {config["epsilon"]:g}'
    return f'target epsilon {1 / results["beta"]:g}, beta={results["beta"]:g}'
  if results['mech'] == 'none':
    return 'no noise'
  return f'beta={results["beta"]:g}'


def _scores(report: dict[str, Any]) -> str:
  """Accuracy, balanced accuracy and the threshold-free score of one split's report."""
  ranked = (f'ROC AUC {report["roc_auc"]:.4f}' if 'roc_auc' in report
            else f'QW kappa {report["quadratic_weighted_kappa"]:.4f}')
  return (f'accuracy {report["accuracy"]:.4f}, balanced {report["balanced_accuracy"]:.4f}, '
          f'{ranked}')


def summary_lines(results: dict[str, Any]) -> list[str]:
  """The final human-readable summary of a run: `published_summary_lines` of its release, with
  the curator's lines (the not-covered train accuracy, where results.json is) among them."""
  return _summary_lines(results, curator=True)


def published_summary_lines(release: dict[str, Any]) -> list[str]:
  """The summary lines that may be published: computed from release.json (or results.json
  through `public_release`) alone, so a check of the release covers them."""
  return _summary_lines(release, curator=False)


def _summary_lines(results: dict[str, Any], curator: bool) -> list[str]:
  everything, results = results, public_release(results)  # Published lines read only this.
  release = results['release']
  lines = []
  if curator and everything.get('reused'):
    lines.append(f'reused the finished run in {everything["workdir"]} (same settings and data); '
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
  if curator:
    lines.append(f'train {everything["not_covered"]["train_accuracy"]:.4f} (not covered: a '
                 'statistic of the training data outside the mechanism)')
  lines += [f'privacy: {results["guarantee"]}',
            f'privacy unit: {results["privacy_unit"]}',
            f'model selected at epoch {release["best_epoch"]} by {release["selection"]}; '
            f'pretrained={results["pretrained"]}']
  lines += audit_lib.summary_lines(everything if curator else results, curator)
  if curator:
    workdir = Path(everything['workdir'])
    lines.append(f'results: {workdir / "results.json"} (the curator\'s record, not covered; '
                 f'what may be published: {workdir / "release"})')
  config = results.get('config', {})
  if (results['data'] == 'demo' and results['mech'] == 'dpsgd' and not results['pretrained']
      and config.get('arch') not in ('scatternet', 'scatternet_cnn')):
    lines.append(SCATTERNET_DEMO_NOTE.format(numbers=SCATTERNET_DEMO_NUMBERS))
  if results.get('data_note'):
    lines.append(results['data_note'])
  return lines
