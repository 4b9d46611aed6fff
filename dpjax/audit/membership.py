"""Membership inference on a trained model, from per-example losses.

Two attacks, both black-box and both needing only what a trainer already has
(per-example losses of the final model on its training split = members, and
on a held-out split = non-members):

* ``'loss_threshold'`` (Yeom et al., CSF 2018): score = -loss; a lower loss
  means "member".
* ``'class_calibrated'`` (difficulty calibration in the spirit of Watson et
  al., ICLR 2022, without reference models): the non-members are split in
  two halves with an explicit JAX key. On the *reference* half we estimate,
  per true class c, the mean mu_c and standard deviation sigma_c of the
  non-member loss. Every remaining example x of class c then gets the score
  ``-(loss(x) - mu_c) / sigma_c``: how unusually low its loss is for its
  class. Members and the *evaluation* half of the non-members are scored; the
  reference half is never scored (it would be scored against itself). A
  class with fewer than 2 reference examples (or sigma_c = 0) falls back to
  the pooled reference mean and standard deviation.

For each attack :func:`membership_inference` reports the ROC AUC, the TPR at
FPR 0.1% and 1% (the highest TPR among thresholds with FPR <= target: no
interpolation, so with fewer than 1000 non-members "TPR at 0.1%" is the TPR
at zero false positives), the advantage max(TPR - FPR), and a Clopper-Pearson
lower confidence bound on epsilon (:func:`split_epsilon_lower_bound`: the
threshold is chosen on one half of the examples and evaluated on the other).

Caveat on that epsilon: Clopper-Pearson treats every example's outcome as an
independent trial. That holds across independently trained models, not for
the examples of ONE model, which all share its training randomness. So for
one run it is indicative, not a proof; the rigorous one-run statement is the
canary audit of :mod:`dpjax.audit.one_run` (Steinke et al. 2023), whose
analysis handles exactly this dependence.

>>> import numpy as np
>>> result = membership_inference(np.array([0.1, 0.2, 0.3]),
...                               np.array([0.4, 0.5, 0.6]))
>>> result['loss_threshold']['auc'], result['loss_threshold']['advantage']
(1.0, 1.0)

Reading the numbers (see docs/AUDITING.md): AUC 0.5 and advantage 0 mean the
attack cannot tell members from non-members. The epsilon bound is a lower
bound on the epsilon of the whole training pipeline only if members and
non-members are exchangeable (one pool split at random); a held-out split
from another source (e.g. the Kermany pneumonia test set) can make it
positive through distribution shift alone.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import scipy.stats

from dpjax import metrics as metrics_lib

ATTACKS = ('loss_threshold', 'class_calibrated')
TARGET_FPRS = (0.001, 0.01)
# Sub-keys of the one key membership_inference takes.
_CALIBRATION_SPLIT_KEY = 0
_THRESHOLD_SPLIT_KEY = 1


def _as_key(key: jax.Array | int) -> jax.Array:
  if isinstance(key, (int, np.integer)):
    return jax.random.key(int(key))
  return key


def _permutation(key: jax.Array | int, length: int) -> np.ndarray:
  """A random permutation of range(length) determined by the JAX key.

  The auditor's own splits are not private data, so a NumPy generator seeded
  from the key's bits does them: no recompilation for every length.
  """
  key = _as_key(key)
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  seed = np.asarray(key, np.uint32).reshape(-1)
  return np.random.default_rng(seed).permutation(length)


def _check_scores(scores, is_member) -> tuple[np.ndarray, np.ndarray]:
  scores = np.asarray(scores, np.float64).reshape(-1)
  is_member = np.asarray(is_member).reshape(-1)
  if scores.shape != is_member.shape:
    raise ValueError(
        f'Expected scores and is_member of equal length, got {scores.shape}'
        f' and {is_member.shape}')
  if not np.all(np.isfinite(scores)):
    raise ValueError('Expected finite scores (got NaN or infinity)')
  is_member = is_member.astype(bool)
  num_members = int(is_member.sum())
  if num_members == 0 or num_members == len(is_member):
    raise ValueError(
        f'Expected at least one member and one non-member, got'
        f' {num_members=} of {len(is_member)}')
  return scores, is_member


def roc_curve(scores, is_member) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ROC curve of the test "score >= threshold means member".

  Args:
    scores: float ``[n]``; higher means "more likely a member".
    is_member: bool ``[n]``, the truth.

  Returns:
    ``(fpr, tpr, thresholds)``, each ``[k + 1]`` for the k distinct scores,
    ordered by decreasing threshold: ``thresholds[0] = +inf`` (nobody
    guessed, the point (0, 0)), then every distinct score, ending at (1, 1).
    Tied scores enter together, so the curve never splits a tie.
  """
  scores, is_member = _check_scores(scores, is_member)
  order = np.argsort(-scores, kind='stable')
  sorted_scores = scores[order]
  sorted_member = is_member[order]
  true_positives = np.cumsum(sorted_member)
  false_positives = np.cumsum(~sorted_member)
  # Keep the last index of every run of tied scores.
  last_of_tie = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
  tpr = np.r_[0, true_positives[last_of_tie]] / true_positives[-1]
  fpr = np.r_[0, false_positives[last_of_tie]] / false_positives[-1]
  thresholds = np.r_[np.inf, sorted_scores[last_of_tie]]
  return fpr, tpr, thresholds


def auc(scores, is_member) -> float:
  """Area under the ROC curve, ties counted half: :func:`dpjax.metrics.roc_auc` with
  "member" as the positive class, after checking the inputs (finite, both groups present).

  Equals P(member score > non-member score) + P(equal) / 2, the Mann-Whitney
  U statistic over (num_members * num_nonmembers).
  """
  scores, is_member = _check_scores(scores, is_member)
  return metrics_lib.roc_auc(scores, labels=is_member)


def tpr_at_fpr(scores, is_member, target_fpr) -> float | np.ndarray:
  """Highest TPR over thresholds whose FPR is <= ``target_fpr``.

  No interpolation between thresholds (it would credit a randomised attack
  the scores do not contain). ``target_fpr`` may be a scalar or an array.
  """
  target = np.asarray(target_fpr, np.float64)
  if np.any((target < 0) | (target > 1)):
    raise ValueError(f'Expected 0 <= target_fpr <= 1, got {target_fpr}')
  fpr, tpr, _ = roc_curve(scores, is_member)
  # fpr and tpr are non-decreasing: take the last point with fpr <= target.
  last = np.searchsorted(fpr, target + 1e-12 * (1 + target), side='right') - 1
  result = tpr[last]
  return float(result) if result.ndim == 0 else result


def advantage(scores, is_member) -> float:
  """Membership advantage max over thresholds of (TPR - FPR) (Yeom et al.)."""
  fpr, tpr, _ = roc_curve(scores, is_member)
  return float(np.max(tpr - fpr))


def epsilon_from_rates(tpr: float, fpr: float, delta: float) -> float:
  """Point estimate of the epsilon implied by one (TPR, FPR) pair.

  An (eps, delta)-DP training algorithm forces every membership test to
  satisfy TPR <= e^eps FPR + delta and (1 - FPR) <= e^eps (1 - TPR) + delta,
  so eps >= max(log((TPR - delta) / FPR), log((1 - FPR - delta) / (1 - TPR))).

  .. warning::
    With EMPIRICAL rates this is a point estimate, not a bound: sampling
    error alone makes it positive (and infinite at zero false positives).
    Use :func:`epsilon_lower_bound` for a statement at a confidence level.

  Returns:
    The estimate, >= 0 (``inf`` when a rate is exactly 0 or 1).
  """
  candidates = [0.0]
  with np.errstate(divide='ignore'):
    if tpr > delta:
      candidates.append(math.log(tpr - delta) - np.log(fpr))
    if 1 - fpr > delta:
      candidates.append(math.log(1 - fpr - delta) - np.log(1 - tpr))
  return float(max(candidates))


def clopper_pearson_lower(successes, trials, confidence: float):
  """One-sided lower Clopper-Pearson bound: P(true rate >= it) >= confidence.

  Works elementwise on arrays; 0 where ``successes == 0``.
  """
  successes = np.asarray(successes, np.float64)
  trials = np.asarray(trials, np.float64)
  with np.errstate(invalid='ignore'):
    bound = scipy.stats.beta.ppf(1 - confidence, successes,
                                 trials - successes + 1)
  return np.where(successes > 0, bound, 0.0)


def clopper_pearson_upper(successes, trials, confidence: float):
  """One-sided upper Clopper-Pearson bound: P(true rate <= it) >= confidence.

  Works elementwise on arrays; 1 where ``successes == trials``.
  """
  successes = np.asarray(successes, np.float64)
  trials = np.asarray(trials, np.float64)
  with np.errstate(invalid='ignore'):
    bound = scipy.stats.beta.ppf(confidence, successes + 1,
                                 trials - successes)
  return np.where(successes < trials, bound, 1.0)


def epsilon_lower_bound(true_positives, num_members, false_positives,
                        num_nonmembers, delta: float,
                        confidence: float = 0.95):
  """Lower confidence bound on epsilon from one fixed membership test.

  Both DP inequalities, TPR <= e^eps FPR + delta and
  1 - FPR <= e^eps (1 - TPR) + delta, are weakest when the TPR is small and
  the FPR large. So the true TPR is bounded below and the true FPR above by
  one-sided Clopper-Pearson bounds, each at confidence
  ``1 - (1 - confidence) / 2`` (Bonferroni over the two), and the bound is
  max(0, log((TPR_lo - delta) / FPR_hi), log((1 - FPR_hi - delta) /
  (1 - TPR_lo))).

  Valid when the test (threshold) was fixed WITHOUT looking at these
  examples, and membership was decided independently of the examples (one
  pool split at random). Works elementwise on arrays of counts.

  Returns:
    eps_lo >= 0: with probability >= ``confidence``, the training algorithm
    is not (eps, delta)-DP for any eps < eps_lo.
  """
  per_rate_confidence = 1 - (1 - confidence) / 2
  tpr_lo = clopper_pearson_lower(true_positives, num_members,
                                 per_rate_confidence)
  fpr_hi = clopper_pearson_upper(false_positives, num_nonmembers,
                                 per_rate_confidence)
  with np.errstate(divide='ignore', invalid='ignore'):
    direct = np.log(np.maximum(tpr_lo - delta, 0)) - np.log(fpr_hi)
    complement = (np.log(np.maximum(1 - fpr_hi - delta, 0))
                  - np.log(1 - tpr_lo))
  bound = np.maximum(0.0, np.fmax(direct, complement))
  return float(bound) if bound.ndim == 0 else bound


def split_epsilon_lower_bound(scores, is_member, delta: float,
                              key: jax.Array | int = 0,
                              confidence: float = 0.95) -> float:
  """Epsilon lower bound with the threshold chosen on held-apart data.

  Choosing the best of many thresholds on the same examples that the bound is
  computed on voids its confidence. So the examples are split in two halves
  with ``key`` (members and non-members separately, so both halves hold
  both); the threshold that maximises :func:`epsilon_lower_bound` on the
  first half is then evaluated, alone, on the second half. Returns that
  second-half bound (0 when a half has no member or no non-member).
  """
  scores, is_member = _check_scores(scores, is_member)
  permutation = _permutation(key, len(scores))
  select = np.zeros(len(scores), bool)
  for group in (is_member, ~is_member):
    group_in_random_order = permutation[group[permutation]]
    select[group_in_random_order[::2]] = True
  evaluate = ~select
  counts = [int(np.sum(part & group)) for part in (select, evaluate)
            for group in (is_member, ~is_member)]
  if min(counts) == 0:
    return 0.0
  fpr, tpr, thresholds = roc_curve(scores[select], is_member[select])
  select_members, select_nonmembers = counts[0], counts[1]
  bounds = epsilon_lower_bound(
      np.rint(tpr * select_members), select_members,
      np.rint(fpr * select_nonmembers), select_nonmembers, delta, confidence)
  threshold = thresholds[int(np.argmax(bounds))]
  guessed = scores[evaluate] >= threshold
  evaluate_member = is_member[evaluate]
  return epsilon_lower_bound(
      int(np.sum(guessed & evaluate_member)), counts[2],
      int(np.sum(guessed & ~evaluate_member)), counts[3], delta, confidence)


def max_split_epsilon_lower_bound(num_members: int, num_nonmembers: int,
                                  delta: float, confidence: float = 0.95) -> float:
  """The largest value :func:`split_epsilon_lower_bound` can return for these counts.

  Its bound is computed on the evaluation half (``n // 2`` of the members and
  of the non-members), and is largest when the test there is perfect (every
  member caught, no non-member): :func:`epsilon_lower_bound` grows with the
  true positives and falls with the false positives. No attack on this many
  examples can show an epsilon above this value, e.g. about 6.5 for 5,000
  members and 300 non-members at delta = 1e-5.
  """
  members, nonmembers = int(num_members) // 2, int(num_nonmembers) // 2
  if members == 0 or nonmembers == 0:
    return 0.0
  return epsilon_lower_bound(members, members, 0, nonmembers, delta, confidence)


def attack_metrics(scores, is_member, delta: float,
                   key: jax.Array | int = 0,
                   confidence: float = 0.95) -> dict[str, float]:
  """All reported numbers of one attack's scores (higher = member)."""
  scores, is_member = _check_scores(scores, is_member)
  tprs = tpr_at_fpr(scores, is_member, np.array(TARGET_FPRS))
  metrics = {
      'auc': auc(scores, is_member),
      **{f'tpr_at_fpr_{target}': float(value)
         for target, value in zip(TARGET_FPRS, tprs)},
      'advantage': advantage(scores, is_member),
      'epsilon_lower_bound': split_epsilon_lower_bound(
          scores, is_member, delta, key, confidence),
      # What a perfect attack would show with these counts: a bound near it says little.
      'epsilon_lower_bound_max': max_split_epsilon_lower_bound(
          int(is_member.sum()), int((~is_member).sum()), delta, confidence),
      'num_members': int(is_member.sum()),
      'num_nonmembers': int((~is_member).sum()),
  }
  return metrics


def class_calibrated_scores(
    member_losses, nonmember_losses, member_labels, nonmember_labels,
    key: jax.Array | int = 0,
) -> tuple[np.ndarray, np.ndarray]:
  """Scores of the class-calibrated attack (see the module docstring).

  Returns:
    ``(scores, is_member)`` over all members and the evaluation half of the
    non-members (the reference half is used up by the calibration).
  """
  member_losses = np.asarray(member_losses, np.float64).reshape(-1)
  nonmember_losses = np.asarray(nonmember_losses, np.float64).reshape(-1)
  member_labels = np.asarray(member_labels).reshape(-1)
  nonmember_labels = np.asarray(nonmember_labels).reshape(-1)
  if member_labels.shape != member_losses.shape:
    raise ValueError(f'Expected member_labels of shape {member_losses.shape},'
                     f' got {member_labels.shape}')
  if nonmember_labels.shape != nonmember_losses.shape:
    raise ValueError(
        f'Expected nonmember_labels of shape {nonmember_losses.shape}, got'
        f' {nonmember_labels.shape}')
  num_nonmembers = len(nonmember_losses)
  if num_nonmembers < 4:
    raise ValueError(
        f'Expected {num_nonmembers=} >= 4 for the class calibration')
  permutation = _permutation(key, len(nonmember_losses))
  reference = permutation[: len(permutation) // 2]
  evaluation = permutation[len(permutation) // 2:]
  reference_losses = nonmember_losses[reference]
  reference_labels = nonmember_labels[reference]

  pooled_mean = reference_losses.mean()
  pooled_std = reference_losses.std(ddof=1)
  if not pooled_std > 0:
    pooled_std = 1.0  # All reference losses equal: only shift, no scale.
  classes = np.unique(np.concatenate([member_labels, nonmember_labels]))
  class_mean = {}
  class_std = {}
  for label in classes.tolist():  # Loop over classes, not examples.
    losses_of_class = reference_losses[reference_labels == label]
    std = losses_of_class.std(ddof=1) if len(losses_of_class) >= 2 else 0.0
    if std > 0:
      class_mean[label], class_std[label] = losses_of_class.mean(), std
    else:
      class_mean[label], class_std[label] = pooled_mean, pooled_std

  losses = np.concatenate([member_losses, nonmember_losses[evaluation]])
  labels = np.concatenate([member_labels, nonmember_labels[evaluation]])
  index = np.searchsorted(classes, labels)
  means = np.array([class_mean[c] for c in classes.tolist()])[index]
  stds = np.array([class_std[c] for c in classes.tolist()])[index]
  scores = -(losses - means) / stds
  is_member = np.r_[np.ones(len(member_losses), bool),
                    np.zeros(len(evaluation), bool)]
  return scores, is_member


def membership_inference(
    member_losses,
    nonmember_losses,
    member_labels=None,
    nonmember_labels=None,
    key: jax.Array | int = 0,
    delta: float = 1e-5,
    confidence: float = 0.95,
) -> dict[str, dict[str, float]]:
  """Runs the membership-inference attacks on per-example losses.

  Args:
    member_losses: float ``[n_members]``, per-example losses of the trained
      model on its training examples.
    nonmember_losses: float ``[n_nonmembers]``, the same on held-out examples.
    member_labels, nonmember_labels: int true classes; both or neither. With
      them the class-calibrated attack runs too.
    key: JAX key (or int seed) for the calibration split and the threshold
      split of the epsilon bound.
    delta: the delta of the claimed (eps, delta) guarantee, for the epsilon
      bound; pass the run's delta.
    confidence: confidence level of the epsilon bound.

  Returns:
    ``{attack: {'auc', 'tpr_at_fpr_0.001', 'tpr_at_fpr_0.01', 'advantage',
    'epsilon_lower_bound', 'epsilon_lower_bound_max', 'num_members',
    'num_nonmembers'}}`` for attack in
    ``'loss_threshold'`` and (with labels) ``'class_calibrated'``.
  """
  if (member_labels is None) != (nonmember_labels is None):
    raise ValueError('Expected both member_labels and nonmember_labels, or '
                     'neither')
  key = _as_key(key)
  member_losses = np.asarray(member_losses, np.float64).reshape(-1)
  nonmember_losses = np.asarray(nonmember_losses, np.float64).reshape(-1)
  scores = -np.concatenate([member_losses, nonmember_losses])
  is_member = np.r_[np.ones(len(member_losses), bool),
                    np.zeros(len(nonmember_losses), bool)]
  threshold_key = jax.random.fold_in(key, _THRESHOLD_SPLIT_KEY)
  results = {
      'loss_threshold': attack_metrics(scores, is_member, delta,
                                       threshold_key, confidence)}
  if member_labels is not None:
    calibrated, calibrated_member = class_calibrated_scores(
        member_losses, nonmember_losses, member_labels, nonmember_labels,
        jax.random.fold_in(key, _CALIBRATION_SPLIT_KEY))
    results['class_calibrated'] = attack_metrics(
        calibrated, calibrated_member, delta, threshold_key, confidence)
  return results


def audit_membership_from_losses(
    train_losses, train_labels, test_losses, test_labels,
    key: jax.Array | int = 0, delta: float = 1e-5,
) -> dict[str, float]:
  """What a trainer calls: both attacks, flattened for a results table.

  Returns:
    ``{'mia_<attack>_<metric>': value}``, e.g. ``'mia_loss_threshold_auc'``.
  """
  results = membership_inference(train_losses, test_losses, train_labels,
                                 test_labels, key=key, delta=delta)
  return {f'mia_{attack}_{metric}': value
          for attack, metrics in results.items()
          for metric, value in metrics.items()}
