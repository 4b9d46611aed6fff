"""Privacy auditing with one training run (Steinke, Nasr, Jagielski 2023).

Protocol:

1. Draw m canaries and include each in the training set independently with
   probability 1/2 (:func:`canary_inclusion`, from an explicit JAX key).
2. Train ONCE, then give every canary a score, higher meaning "looks
   included" (e.g. minus its loss, or, white-box, the inner product of the
   parameter change with the canary's gradient direction).
3. Guess "included" for the ``k_pos`` highest scores and "excluded" for the
   ``k_neg`` lowest, abstain on the rest (:func:`guesses_from_scores`).
   ``k_pos`` and ``k_neg`` must be fixed before looking at the scores.
4. Turn the number of correct guesses into an epsilon lower bound
   (:func:`one_run_lower_bound`).

The statistics (their main theorem for approximate DP, evaluated as in their
Algorithm 2): if training is (eps, delta)-DP with respect to adding or
removing one canary, then the number W of correct guesses among r guesses
satisfies, for every v,

  P[W >= v] <= P[B >= v] + 2 m delta max_{i=1..m} P[v - i <= B < v] / i,

with B ~ Binomial(r, e^eps / (1 + e^eps)): a guesser can do no better than
eps-randomised response on every canary, plus a delta slack. (For delta = 0
this is the plain stochastic dominance of W by B.) So observing v correct
guesses rejects (eps, delta)-DP at significance 1 - confidence when that
right-hand side is <= 1 - confidence; the returned bound is the largest
eps that is rejected. The right-hand side grows with eps, so the search is a
bisection.

Neighbouring relation: the bound refers to add/remove-one-canary adjacency,
the relation of ``PrivacyLedger('poisson')``. Compare it with that ledger's
epsilon at the same delta. A ``'shuffled'`` ledger states replace-one
adjacency, so the comparison is not like for like: audit runs with Poisson
sampling.

Reading it: a correct DP-SGD run must give a bound below the accountant's
epsilon (except with probability 1 - confidence). A bound ABOVE it means the
implementation (or the accounting) is broken. A bound far below it proves
nothing: one-run audits with black-box scores are loose, and even white-box
canaries recover only part of the true epsilon.

The bound can never exceed :func:`max_lower_bound`, its value when every
guess is right: about 4.17 for 1,000 canaries and 100 + 100 guesses at
delta = 1e-5. A claim at or above that maximum cannot be refuted by the audit
whatever the implementation does, so report the maximum beside every bound,
and pick the number of guesses with :func:`guesses_needed` (before scoring)
so that the maximum exceeds the claimed epsilon; :func:`audit_from_scores`
with ``claimed_epsilon`` says plainly when it cannot.

>>> round(one_run_lower_bound(num_guesses=100, num_correct=100,
...                           num_canaries=1000, delta=0.0), 2)
3.49
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import scipy.special
import scipy.stats


def canary_inclusion(key: jax.Array, num_canaries: int) -> jax.Array:
  """Bool ``[num_canaries]``: independent fair coin per canary, True = train
  on it. Use a key reserved for this (not the noise or sampling key)."""
  if num_canaries < 1:
    raise ValueError(f'Expected {num_canaries=} >= 1')
  return jax.random.bernoulli(key, 0.5, shape=(num_canaries,))


def guesses_from_scores(scores, k_pos: int, k_neg: int) -> np.ndarray:
  """Int8 ``[m]``: +1 ("included") for the ``k_pos`` highest scores, -1
  ("excluded") for the ``k_neg`` lowest, 0 (abstain) otherwise.

  Ties are broken by canary index (a stable sort), which is independent of
  the inclusion coins, so the guarantee is unaffected.
  """
  scores = np.asarray(scores, np.float64).reshape(-1)
  num_canaries = len(scores)
  if k_pos < 0 or k_neg < 0 or k_pos + k_neg > num_canaries:
    raise ValueError(
        f'Expected k_pos, k_neg >= 0 and {k_pos=} + {k_neg=} <='
        f' {num_canaries=}')
  if np.any(np.isnan(scores)):
    raise ValueError('Expected scores without NaN')
  order = np.argsort(-scores, kind='stable')  # Highest first.
  guesses = np.zeros(num_canaries, np.int8)
  guesses[order[:k_pos]] = 1
  guesses[order[num_canaries - k_neg:]] = -1
  return guesses


def one_run_p_value(num_guesses: int, num_correct: int, num_canaries: int,
                    epsilon: float, delta: float) -> float:
  """Upper bound on P[>= num_correct correct guesses] under (eps, delta)-DP.

  The right-hand side of the bound in the module docstring; the maximum over
  i stops at i = v because for i > v the numerator stays P[B < v] while i
  grows.
  """
  _check_counts(num_guesses, num_correct, num_canaries, delta)
  if not epsilon >= 0:
    raise ValueError(f'Expected {epsilon=} >= 0')
  r, v = int(num_guesses), int(num_correct)
  success = scipy.special.expit(epsilon)  # e^eps / (1 + e^eps)
  tail = scipy.stats.binom.sf(v - 1, r, success)  # P[B >= v]
  if delta == 0 or v == 0:
    return float(min(tail, 1.0))
  shortfall = np.arange(1, v + 1)
  # P[v - i <= B < v] = P[B >= v - i] - P[B >= v].
  window = scipy.stats.binom.sf(v - shortfall - 1, r, success) - tail
  slack = np.max(window / shortfall)
  return float(min(tail + 2 * num_canaries * delta * slack, 1.0))


def _check_counts(num_guesses, num_correct, num_canaries, delta):
  if not 0 <= num_correct <= num_guesses <= num_canaries:
    raise ValueError(
        f'Expected 0 <= {num_correct=} <= {num_guesses=} <= {num_canaries=}')
  if not 0 <= delta <= 1:
    raise ValueError(f'Expected 0 <= {delta=} <= 1')


def one_run_lower_bound(num_guesses: int, num_correct: int,
                        num_canaries: int, delta: float,
                        confidence: float = 0.95) -> float:
  """Empirical epsilon lower bound of a one-run canary audit.

  Args:
    num_guesses: r, the canaries guessed on (k_pos + k_neg, no abstentions).
    num_correct: v, the correct guesses among them.
    num_canaries: m, all canaries whose inclusion was a coin flip (guessed or
      not): the delta slack scales with m.
    delta: the delta of the (eps, delta) claim under audit (the run's delta).
    confidence: 1 - significance; 0.95 rejects at 5%.

  Returns:
    The largest eps such that (eps, delta)-DP is rejected at the confidence
    level, i.e. ``one_run_p_value(eps) <= 1 - confidence``; 0.0 if even
    eps = 0 is not rejected. With probability >= ``confidence`` over the
    canary coins and the training randomness, a truly (eps, delta)-DP
    training run returns a value <= eps.
  """
  _check_counts(num_guesses, num_correct, num_canaries, delta)
  if not 0 < confidence < 1:
    raise ValueError(f'Expected 0 < {confidence=} < 1')
  significance = 1 - confidence

  def excess(epsilon):  # > 0 while (epsilon, delta) is rejected.
    return significance - one_run_p_value(
        num_guesses, num_correct, num_canaries, epsilon, delta)

  if excess(0.0) <= 0:
    return 0.0
  # Bisection keeping excess(low) > 0 >= excess(high), so the value returned
  # is always rejected (a root finder may land on either side).
  low, high = 0.0, 1.0
  while excess(high) > 0:
    low, high = high, 2 * high
    if high > 1e4:  # Unreachable for finite counts; guards a logic error.
      raise RuntimeError('one_run_lower_bound: no upper bracket found')
  while high - low > 1e-7 * max(1.0, high):
    middle = (low + high) / 2
    if excess(middle) > 0:
      low = middle
    else:
      high = middle
  return float(low)


def max_lower_bound(num_guesses: int, num_canaries: int, delta: float,
                    confidence: float = 0.95) -> float:
  """The largest value :func:`one_run_lower_bound` can return for these counts.

  It is the bound with every one of the ``num_guesses`` guesses correct (the
  bound grows with the number of correct guesses). An audit with these counts
  cannot refute any claimed epsilon >= this value, however broken the
  mechanism: e.g. about 4.17 for 1,000 canaries, 200 guesses, delta = 1e-5.
  """
  return one_run_lower_bound(num_guesses, num_guesses, num_canaries, delta,
                             confidence)


def guesses_needed(epsilon: float, delta: float, num_canaries: int,
                   confidence: float = 0.95) -> int | None:
  """The fewest guesses r <= ``num_canaries`` whose attainable maximum
  (:func:`max_lower_bound`) exceeds ``epsilon``; None when even r =
  ``num_canaries`` (guessing on every canary) does not: then no audit with
  this many canaries can refute an (epsilon, delta) claim.

  Uses only public quantities (the claim, delta, the canary count), so the
  number may be fixed before scoring, as the confidence level requires. The
  returned r always satisfies ``max_lower_bound(r, ...) > epsilon`` (checked
  here). It is the fewest such r because the maximum grows with r for a fixed
  number of canaries (the search is a bisection; a test checks the growth on a
  grid of canary counts and deltas). More canaries raise the maximum only up
  to a point: the delta slack of the theorem grows with their number.
  """
  if not epsilon >= 0:
    raise ValueError(f'Expected {epsilon=} >= 0')
  if num_canaries < 1:
    raise ValueError(f'Expected {num_canaries=} >= 1')

  def enough(r):
    return max_lower_bound(r, num_canaries, delta, confidence) > epsilon

  if not math.isfinite(epsilon) or not enough(num_canaries):
    return None
  low, high = 0, num_canaries  # not enough(low) (or low = 0), enough(high).
  while high - low > 1:
    middle = (low + high) // 2
    if enough(middle):
      high = middle
    else:
      low = middle
  return high


def verdict(lower_bound: float, attainable_max: float,
            claimed_epsilon: float | None, confidence: float = 0.95) -> str:
  """One plain sentence on what a lower bound says about a claimed epsilon."""
  if claimed_epsilon is None or not math.isfinite(claimed_epsilon):
    return 'no finite claimed epsilon: nothing for the audit to test'
  if lower_bound > claimed_epsilon:
    return (f'CLAIM REFUTED: lower bound {lower_bound:.3g} > claimed epsilon '
            f'{claimed_epsilon:.3g}: a bug in clipping, noise, sampling or '
            f'accounting (or bad luck, probability <= {1 - confidence:.2g})')
  if attainable_max <= claimed_epsilon:
    return (f'CANNOT TEST the claimed epsilon {claimed_epsilon:.3g}: even with '
            f'every guess right the bound could reach only {attainable_max:.3g}, '
            'so this audit cannot reveal a violation of the claim')
  return (f'consistent: lower bound {lower_bound:.3g} <= claimed epsilon '
          f'{claimed_epsilon:.3g} (the audit could have shown up to '
          f'{attainable_max:.3g})')


def audit_from_scores(scores, included, delta: float, k_pos: int,
                      k_neg: int, confidence: float = 0.95,
                      claimed_epsilon: float | None = None) -> dict[str, Any]:
  """One-run audit from canary scores and the true inclusion coins.

  Args:
    scores: float ``[m]``, higher = "looks included".
    included: bool ``[m]``, from :func:`canary_inclusion`.
    delta: the run's delta.
    k_pos, k_neg: guess "included" for the ``k_pos`` highest scores and
      "excluded" for the ``k_neg`` lowest; fix them before scoring (choosing
      them after looking at the result voids the confidence level), e.g. with
      :func:`guesses_needed`.
    confidence: as in :func:`one_run_lower_bound`.
    claimed_epsilon: the accountant's epsilon at ``delta`` under audit, if
      any: adds whether the audit can test it and a verdict.

  Returns:
    ``{'epsilon_lower_bound', 'epsilon_lower_bound_max', 'num_guesses',
    'num_correct', 'num_canaries', 'num_included', 'guess_accuracy', 'delta',
    'confidence'}``; ``epsilon_lower_bound_max`` is :func:`max_lower_bound` of
    these counts. With ``claimed_epsilon`` also ``'claimed_epsilon'``,
    ``'can_test_claim'`` (whether that maximum exceeds the claim) and
    ``'verdict'`` (:func:`verdict`).
  """
  included = np.asarray(included).reshape(-1).astype(bool)
  scores = np.asarray(scores).reshape(-1)
  if scores.shape != included.shape:
    raise ValueError(f'Expected scores and included of equal length, got'
                     f' {scores.shape} and {included.shape}')
  guesses = guesses_from_scores(scores, k_pos, k_neg)
  truth = np.where(included, 1, -1)
  num_guesses = int(np.sum(guesses != 0))
  num_correct = int(np.sum(guesses == truth))
  bound = one_run_lower_bound(num_guesses, num_correct, len(scores), delta,
                              confidence)
  attainable = max_lower_bound(num_guesses, len(scores), delta, confidence)
  result = {
      'epsilon_lower_bound': bound,
      'epsilon_lower_bound_max': attainable,
      'num_guesses': num_guesses,
      'num_correct': num_correct,
      'num_canaries': len(scores),
      'num_included': int(included.sum()),
      'guess_accuracy': num_correct / max(num_guesses, 1),
      'delta': float(delta),
      'confidence': float(confidence),
  }
  if claimed_epsilon is not None:
    claimed_epsilon = float(claimed_epsilon)
    result.update(
        claimed_epsilon=claimed_epsilon,
        can_test_claim=bool(math.isfinite(claimed_epsilon)
                            and attainable > claimed_epsilon),
        verdict=verdict(bound, attainable, claimed_epsilon, confidence))
  return result


def dirac_canary_scores(initial_params, final_params,
                        canary_coordinates) -> np.ndarray:
  """White-box scores of Dirac canaries: the parameter change along each.

  A Dirac canary's gradient is ``-g * e_j`` for its own coordinate j of the
  flattened parameters (norm g, no other effect), so gradient descent on it
  moves parameter j UP. Its score is ``final[j] - initial[j]``.
  """
  flat_initial, _ = jax.flatten_util.ravel_pytree(initial_params)
  flat_final, _ = jax.flatten_util.ravel_pytree(final_params)
  change = jnp.asarray(flat_final) - jnp.asarray(flat_initial)
  return np.asarray(change[jnp.asarray(canary_coordinates)])
