"""Accounted hyperparameter tuning: the privacy of releasing the best of a RANDOM number of runs.

Releasing the best of K private training runs leaks more than one run: which run wins depends
on the training data through every run. Papernot & Steinke, "Hyperparameter Tuning with Renyi
Differential Privacy" (ICLR 2022, arXiv:2110.03620), show that when K is itself random, drawn
from a truncated negative binomial (TNB) or a Poisson distribution, the selected release is
Renyi-DP with a small overhead over one run, whatever the selection rule.

The procedure the guarantee covers (the assumptions; a deviation voids it):

1. K is drawn from ``TNB(eta, gamma)`` (K >= 1) or ``Poisson(mu)`` (K >= 0) with SECRET
   randomness (:func:`draw_num_runs`: OS entropy by default), independently of the data, and
   K is never published.
2. Run k = 1..K is a private mechanism Q (the same Q every time): e.g. "draw a configuration
   at random from the search space, train with DP-SGD". Each run must satisfy the per-run RDP
   curve that is accounted, with fresh noise and sampling randomness. Where configurations
   differ in their privacy (batch size, epochs, noise), pass every configuration's curve: the
   per-order maximum bounds Q, because a data-independent random choice among mechanisms is a
   mixture, and Renyi divergence is jointly quasi-convex.
3. Only ONE output is released: the run whose score (e.g. a validation metric, computed
   inside the run, from the private data) is best, with its score. The other runs, their
   scores and K itself stay with the curator. Any total order on outputs works; ties may be
   broken by any fixed rule. With Poisson, K = 0 happens with probability e^-mu and the
   release is then "nothing": that outcome is covered too and must be published as such.
4. The neighbouring relation is that of the runs (add/remove-one for a Poisson-sampled
   ledger, replace-one for a shuffled one): the theorem holds for any relation.

Theorem 2 (TNB, eta > -1, 0 < gamma < 1): if Q is (lambda, eps)-RDP and (lambda_hat,
eps_hat)-RDP, lambda > 1, lambda_hat >= 1, the release is (lambda, eps')-RDP with::

    eps' = eps + (1 + eta) (1 - 1/lambda_hat) eps_hat + (1 + eta) log(1/gamma) / lambda_hat
           + log(E[K]) / (lambda - 1),
    E[K] = eta (1 - gamma) / (gamma (1 - gamma**eta))     (eta != 0),
           (1/gamma - 1) / log(1/gamma)                   (eta = 0, the logarithmic law),
           1 / gamma                                       (eta = 1, the geometric law).

The bound holds for every lambda_hat; :func:`tnb_selection_rdp` takes the smallest over the
orders of the per-run curve. Theorem 6 (Poisson, mu > 0): if Q is (lambda, eps)-RDP and
(eps_hat, delta_hat)-DP with exp(eps_hat) <= 1 + 1/(lambda - 1), the release is (lambda,
eps + mu delta_hat + log(mu) / (lambda - 1))-RDP; delta_hat at eps_hat = log(1 + 1/(lambda-1))
is computed from the per-run RDP curve by dp-accounting's RDP-to-DP conversion. In both cases
RDP is non-decreasing in the order, so the bound at an order is lowered to the smallest bound
at any order at least as large. This is the same computation as dp-accounting's
``RepeatAndSelectDpEvent`` (written by one of the paper's authors; tuning_test.py checks they
agree), in the paper's (eta, gamma) parametrisation, and with the Poisson curve made monotone
too.

The RDP curve of the release is turned into (epsilon, delta) with dp-accounting's
``compute_epsilon``, the conversion :meth:`dpjax.PrivacyLedger.epsilon` uses with
``accountant='rdp'`` (so a tuned epsilon and a single run's RDP epsilon are comparable; a single
run's PLD epsilon is tighter and not comparable).

>>> from dpjax.accounting import PrivacyLedger
>>> ledger = PrivacyLedger('poisson')
>>> ledger.record_steps(noise_multiplier=5.0, sampling_prob=128 / 5218, count=2038)
>>> round(ledger.epsilon(1e-4, 'rdp'), 2), round(tuned_epsilon(ledger, 1e-4, eta=1, gamma=0.1), 2)
(0.77, 1.82)
"""

from __future__ import annotations

from collections.abc import Sequence
import math
import os
from typing import Any

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant
import numpy as np

from dpjax import absl_logs
from dpjax import accounting
from dpjax import secret_keys

DISTRIBUTIONS = ('tnb', 'poisson')

# Folded into a JAX key before it seeds the draw of K (ASCII 'tune'), as the noise and sampling
# streams fold in their own tags (dpjax.secret_keys).
TUNING_DOMAIN_TAG = 0x74756E65


# ----------------------------------------------------------------------------- checks


def _check_positive_int(name: str, value: Any) -> int:
  number = accounting.as_real_scalar(name, value)
  if not (math.isfinite(number) and number == math.floor(number) and number >= 1):
    raise ValueError(f'Expected {name} to be an integer >= 1, got {value!r}')
  return int(number)


# ----------------------------------------------------------------------------- distributions


def _check_tnb(eta: Any, gamma: Any) -> tuple[float, float]:
  eta = accounting.as_real_scalar('eta', eta)
  gamma = accounting.as_real_scalar('gamma', gamma)
  if not (math.isfinite(eta) and eta > -1):
    raise ValueError(f'Expected {eta=} > -1 (finite) for the truncated negative binomial')
  if not 0 < gamma < 1:
    raise ValueError(f'Expected 0 < {gamma=} < 1 for the truncated negative binomial')
  return eta, gamma


def _check_mu(mu: Any) -> float:
  mu = accounting.as_real_scalar('mu', mu)
  if not (math.isfinite(mu) and mu >= 1):
    # Theorem 6 holds for mu > 0, but below 1 the run is usually skipped (K = 0 with
    # probability e^-mu > 0.37); dp-accounting also asks for a mean >= 1.
    raise ValueError(f'Expected a finite {mu=} >= 1 for the Poisson number of runs')
  return mu


def _check_distribution(distribution: str, eta, gamma, mu) -> dict[str, float]:
  """The distribution's parameters, checked; the unused ones must be None."""
  if distribution == 'tnb':
    if mu is not None:
      raise ValueError('mu is the Poisson parameter; the truncated negative binomial takes '
                       'eta and gamma')
    if eta is None or gamma is None:
      raise ValueError("distribution='tnb' needs eta and gamma")
    eta, gamma = _check_tnb(eta, gamma)
    return {'eta': eta, 'gamma': gamma}
  if distribution == 'poisson':
    if eta is not None or gamma is not None:
      raise ValueError("eta and gamma are the truncated negative binomial's; "
                       "distribution='poisson' takes mu")
    if mu is None:
      raise ValueError("distribution='poisson' needs mu")
    return {'mu': _check_mu(mu)}
  raise ValueError(f'Expected distribution in {DISTRIBUTIONS}, got {distribution!r}')


def expected_num_runs(distribution: str = 'tnb', *, eta: float | None = None,
                      gamma: float | None = None, mu: float | None = None) -> float:
  """E[K]: ``eta (1 - gamma) / (gamma (1 - gamma**eta))`` for TNB (its eta -> 0 limit
  ``(1/gamma - 1) / log(1/gamma)`` at eta = 0; ``1/gamma`` at eta = 1), ``mu`` for Poisson."""
  params = _check_distribution(distribution, eta, gamma, mu)
  if distribution == 'poisson':
    return params['mu']
  eta, gamma = params['eta'], params['gamma']
  log_gamma = math.log(gamma)
  # eta / (1 - gamma**eta) = eta / -expm1(eta log gamma), -> 1 / log(1/gamma) as eta -> 0.
  factor = -1 / log_gamma if eta == 0 else eta / -math.expm1(eta * log_gamma)
  return (1 / gamma - 1) * factor


def tnb_gamma_for_mean(eta: float, mean: float) -> float:
  """The gamma whose TNB(eta, gamma) has E[K] = ``mean`` (> 1), by bisection (E[K] decreases
  in gamma). Rounded up, so that E[K] at the answer is <= mean (within 1e-12 relative)."""
  eta, _ = _check_tnb(eta, 0.5)
  mean = accounting.as_real_scalar('mean', mean)
  if not (math.isfinite(mean) and mean > 1):
    raise ValueError(f'Expected a finite {mean=} > 1 (a TNB has K >= 1, E[K] > 1)')
  if eta == 1:
    return 1 / mean
  low, high = 0.0, 1.0  # E[K] -> inf as gamma -> 0 and -> 1 as gamma -> 1.
  while high - low > 1e-12 * high:
    middle = (low + high) / 2
    if middle in (low, high):
      break
    if expected_num_runs('tnb', eta=eta, gamma=middle) > mean:
      low = middle
    else:
      high = middle
  return high


def tnb_pmf(eta: float, gamma: float, max_k: int) -> np.ndarray:
  """P[K = k] of TNB(eta, gamma) for k = 0..max_k (entry 0 is 0).

  P[K = k] = (1 - gamma)**k / (gamma**-eta - 1) * prod_{l<k} (l + eta) / (l + 1) (eta != 0),
  (1 - gamma)**k / (k log(1/gamma)) (eta = 0): the negative binomial conditioned on K >= 1.
  """
  eta, gamma = _check_tnb(eta, gamma)
  max_k = _check_positive_int('max_k', max_k)
  pmf = np.zeros(max_k + 1)
  if eta == 0:
    pmf[1] = (1 - gamma) / -math.log(gamma)
  else:
    pmf[1] = (1 - gamma) * eta / math.expm1(-eta * math.log(gamma))
  for k in range(1, max_k):
    pmf[k + 1] = pmf[k] * (1 - gamma) * (k + eta) / (k + 1)
  return pmf


def secret_generator(key_or_rng=None) -> np.random.Generator:
  """A NumPy generator for secret draws (K, and which configuration each run gets):
  ``key_or_rng`` as in :func:`draw_num_runs` (None: 256 bits of OS entropy)."""
  if key_or_rng is None:
    return np.random.Generator(np.random.PCG64(
        np.random.SeedSequence(int.from_bytes(os.urandom(32), 'little'))))
  if isinstance(key_or_rng, np.random.Generator):
    return key_or_rng
  if isinstance(key_or_rng, (np.random.RandomState, np.random.SeedSequence)):
    raise ValueError('Expected a numpy.random.Generator, a secret JAX key or None, got '
                     f'{type(key_or_rng).__name__}')
  import jax  # Only for keys; the accounting itself needs no JAX.
  key = secret_keys.as_secret_key(key_or_rng, what='key_or_rng')
  words = jax.random.bits(jax.random.fold_in(key, TUNING_DOMAIN_TAG), (4,), np.uint32)
  return np.random.Generator(np.random.PCG64(
      np.random.SeedSequence([int(w) for w in np.asarray(words)])))


def draw_num_runs(key_or_rng=None, distribution: str = 'tnb', *, eta: float | None = None,
                  gamma: float | None = None, mu: float | None = None) -> int:
  """K, the number of runs, drawn from TNB(eta, gamma) (K >= 1) or Poisson(mu) (K >= 0).

  The guarantee rests on K being unpredictable: draw it ONCE per search, keep it with the
  curator only (never in results or logs), and never redraw it (a resumed search reuses the
  stored K: redrawing until K is large is not covered).

  Args:
    key_or_rng: None (the default): a generator seeded with 256 bits of OS entropy
      (``os.urandom``), the choice for a real search. A typed secret JAX key (e.g.
      :func:`dpjax.fresh_secret_key`, or ``jax.random.key(0)`` in a test): 4 words drawn from
      ``fold_in(key, TUNING_DOMAIN_TAG)`` seed the generator, so the draw of K is unrelated to
      the noise and sampling streams of the same key. A ``numpy.random.Generator``: used as
      is (the caller answers for its secrecy; tests pass a seeded one). Integer seeds are
      refused (:func:`dpjax.secret_keys.as_secret_key`).
    distribution: 'tnb' or 'poisson'.
    eta, gamma: the TNB's parameters (eta > -1, 0 < gamma < 1; eta = 0 is the logarithmic
      law, eta = 1 the geometric law with mean 1/gamma).
    mu: the Poisson mean (>= 1). K = 0 (probability e^-mu) means: run nothing, release that
      nothing was selected.

  The TNB is sampled exactly by inversion: one uniform of 53 bits against the CDF built from
  :func:`tnb_pmf`'s recurrence (cost ~K). Poisson: NumPy's Poisson sampler.
  """
  params = _check_distribution(distribution, eta, gamma, mu)
  rng = secret_generator(key_or_rng)
  if distribution == 'poisson':
    return int(rng.poisson(params['mu']))
  eta, gamma = params['eta'], params['gamma']
  u = rng.random()  # In [0, 1), 53 random bits.
  k = 1
  p = float(tnb_pmf(eta, gamma, 1)[1])
  cdf = p
  while u >= cdf:
    p *= (1 - gamma) * (k + eta) / (k + 1)
    k += 1
    if p <= cdf * 1e-17:  # Only rounding is left of the tail (mass below 2**-53 here).
      break
    cdf += p
  return k


# ----------------------------------------------------------------------------- RDP curves


def _check_curve(rdp_orders, rdp_epsilons) -> tuple[np.ndarray, np.ndarray]:
  orders = np.asarray(rdp_orders, dtype=np.float64)
  epsilons = np.asarray(rdp_epsilons, dtype=np.float64)
  if orders.ndim != 1 or orders.shape != epsilons.shape or orders.size == 0:
    raise ValueError('Expected rdp_orders and rdp_epsilons to be non-empty 1-d sequences of '
                     f'the same length, got shapes {orders.shape} and {epsilons.shape}')
  if not (np.all(np.isfinite(orders)) and np.all(orders >= 1)):
    raise ValueError(f'Expected finite RDP orders >= 1, got {orders.tolist()}')
  bad = np.isnan(epsilons) | (epsilons < 0)
  if np.any(bad):
    raise ValueError('Expected RDP epsilons >= 0 (inf allowed), got '
                     f'{epsilons[bad].tolist()[:5]} at orders {orders[bad].tolist()[:5]}')
  return orders, epsilons


def _monotone(orders: np.ndarray, bound: np.ndarray) -> np.ndarray:
  """At each order, the smallest bound at any order at least as large (RDP is
  non-decreasing in the order, so each is a valid bound)."""
  out = np.empty_like(bound)
  for i, order in enumerate(orders):
    out[i] = np.min(bound[orders >= order])
  return out


def tnb_selection_rdp(rdp_orders: Sequence[float], rdp_epsilons: Sequence[float], *,
                      eta: float, gamma: float) -> np.ndarray:
  """The RDP curve of the best of K ~ TNB(eta, gamma) runs, at ``rdp_orders``.

  Theorem 2 of Papernot & Steinke (module docstring): each run satisfies the per-run curve
  ``(rdp_orders[i], rdp_epsilons[i])``; lambda_hat ranges over ``rdp_orders`` (all >= 1, as
  the theorem asks) and the smallest term is used; orders <= 1 get inf (the theorem needs
  lambda > 1); then the curve is made non-increasing towards small orders (RDP monotonicity).

  Returns:
    The release's RDP epsilons, aligned with ``rdp_orders`` (inf where nothing is known).
  """
  eta, gamma = _check_tnb(eta, gamma)
  orders, epsilons = _check_curve(rdp_orders, rdp_epsilons)
  mean = expected_num_runs('tnb', eta=eta, gamma=gamma)
  with np.errstate(invalid='ignore'):  # (1 - 1/1) * inf at order 1 is 0, not nan.
    hat = np.where(orders == 1, 0.0, (1 - 1 / orders) * epsilons)
  overhead = (1 + eta) * np.min(hat + math.log(1 / gamma) / orders)
  bound = np.full_like(epsilons, np.inf)
  above_one = orders > 1
  bound[above_one] = (epsilons[above_one] + overhead
                      + math.log(mean) / (orders[above_one] - 1))
  return _monotone(orders, bound)


def poisson_selection_rdp(rdp_orders: Sequence[float], rdp_epsilons: Sequence[float], *,
                          mu: float) -> np.ndarray:
  """The RDP curve of the best of K ~ Poisson(mu) runs (nothing if K = 0), at ``rdp_orders``.

  Theorem 6 of Papernot & Steinke: at each order lambda > 1, eps_hat = log(1 + 1/(lambda-1))
  and delta_hat = the per-run delta at eps_hat, from the per-run RDP curve by dp-accounting's
  ``compute_delta``; the bound is eps + mu * delta_hat + log(mu) / (lambda - 1). Orders <= 1
  get inf; the curve is then made monotone as in :func:`tnb_selection_rdp`.
  """
  mu = _check_mu(mu)
  orders, epsilons = _check_curve(rdp_orders, rdp_epsilons)
  bound = np.full_like(epsilons, np.inf)
  for i, order in enumerate(orders):
    if order <= 1 or not math.isfinite(epsilons[i]):
      continue
    delta_hat, _ = rdp_privacy_accountant.compute_delta(
        orders.tolist(), epsilons.tolist(), math.log1p(1 / (order - 1)))
    bound[i] = epsilons[i] + mu * delta_hat + math.log(mu) / (order - 1)
  return _monotone(orders, bound)


def selection_rdp(rdp_orders: Sequence[float], rdp_epsilons: Sequence[float],
                  distribution: str = 'tnb', *, eta: float | None = None,
                  gamma: float | None = None, mu: float | None = None) -> np.ndarray:
  """:func:`tnb_selection_rdp` or :func:`poisson_selection_rdp`, by ``distribution``."""
  params = _check_distribution(distribution, eta, gamma, mu)
  if distribution == 'tnb':
    return tnb_selection_rdp(rdp_orders, rdp_epsilons, **params)
  return poisson_selection_rdp(rdp_orders, rdp_epsilons, **params)


def ledger_rdp_curve(ledger: accounting.PrivacyLedger,
                     orders: Sequence[float] = accounting.RDP_ORDERS) -> np.ndarray:
  """The per-run RDP curve of a ledger at ``orders``: dp-accounting's RDP accountant on
  the ledger's event (as :meth:`PrivacyLedger.epsilon` with ``accountant='rdp'``; its
  ``compute_epsilon`` on this curve gives that epsilon). All inf for a noiseless ledger.
  dp-accounting's round-off (around 1e-14 at very large noise) can dip below 0; a Renyi
  divergence cannot, so such values are 0 (``compute_epsilon`` reads them as 0 too)."""
  if not isinstance(ledger, accounting.PrivacyLedger):
    raise ValueError(f'Expected a PrivacyLedger, got {type(ledger).__name__}')
  rdp = rdp_privacy_accountant.RdpAccountant(
      orders=list(orders),
      neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
  with absl_logs.errors_only(), np.errstate(divide='ignore', over='ignore', invalid='ignore'):
    rdp.compose(ledger.dp_event())
  curve = np.asarray(rdp._rdp, dtype=np.float64)  # pylint: disable=protected-access
  return np.where(np.isnan(curve), np.inf, np.maximum(curve, 0.0))


def per_run_curve(per_run, orders: Sequence[float] = accounting.RDP_ORDERS
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(orders, epsilons) bounding one run, from ``per_run``: a :class:`PrivacyLedger`, a
  non-empty sequence of ledgers (the per-order maximum: a run is any one of them, chosen
  independently of the data; they must share one neighbouring relation), or an
  ``(orders, epsilons)`` pair."""
  if isinstance(per_run, accounting.PrivacyLedger):
    return np.asarray(orders, np.float64), ledger_rdp_curve(per_run, orders)
  if isinstance(per_run, tuple) and len(per_run) == 2 and not any(
      isinstance(part, accounting.PrivacyLedger) for part in per_run):
    return _check_curve(*per_run)
  if isinstance(per_run, Sequence) and per_run and all(
      isinstance(ledger, accounting.PrivacyLedger) for ledger in per_run):
    relations = {ledger.neighbouring_relation for ledger in per_run}
    if len(relations) > 1:
      raise ValueError(f'Expected ledgers of one neighbouring relation, got {sorted(relations)}')
    return (np.asarray(orders, np.float64),
            np.max([ledger_rdp_curve(ledger, orders) for ledger in per_run], axis=0))
  raise ValueError('Expected a PrivacyLedger, a non-empty sequence of them, or an '
                   f'(orders, epsilons) pair, got {type(per_run).__name__}')


def tuned_epsilon(per_run, delta: float, distribution: str = 'tnb', *,
                  eta: float | None = None, gamma: float | None = None,
                  mu: float | None = None,
                  orders: Sequence[float] = accounting.RDP_ORDERS) -> float:
  """(epsilon, delta)-DP of the tuned release: the best of K random runs (module docstring).

  Args:
    per_run: what bounds ONE run (:func:`per_run_curve`): its ledger, the ledgers of every
      configuration of the search space, or an (orders, epsilons) RDP curve.
    delta: in (0, 1).
    distribution, eta, gamma, mu: the law of K, as in :func:`draw_num_runs`.
    orders: the RDP orders used for ledgers (default: the ledger's, RDP_ORDERS).

  Returns:
    epsilon from dp-accounting's ``compute_epsilon`` on the release's RDP curve (the
    conversion of ``PrivacyLedger.epsilon(delta, 'rdp')``), under the runs' relation.
  """
  delta = accounting.check_delta(delta)
  params = _check_distribution(distribution, eta, gamma, mu)
  curve_orders, epsilons = per_run_curve(per_run, orders)
  tuned = selection_rdp(curve_orders, epsilons, distribution, **params)
  if not np.any(np.isfinite(tuned)):
    return math.inf
  epsilon, _ = rdp_privacy_accountant.compute_epsilon(curve_orders.tolist(), tuned.tolist(),
                                                      delta)
  return float(epsilon)


def calibrate_per_run_noise_multiplier(
    total_epsilon: float,
    delta: float,
    sampling_prob: float,
    steps: int,
    distribution: str = 'tnb',
    *,
    eta: float | None = None,
    gamma: float | None = None,
    mu: float | None = None,
    sampling: str = 'poisson',
    steps_per_epoch: int | None = None,
    relative_tolerance: float = 1e-3,
    min_noise_multiplier: float = accounting.MIN_NOISE_MULTIPLIER,
    extra_gaussian_noise_multipliers: Sequence[float] = (),
) -> float:
  """Smallest per-run noise multiplier z whose TUNED release meets ``total_epsilon``.

  The inverse of :func:`tuned_epsilon`: one run is a ledger of ``steps`` steps at
  (z, ``sampling_prob``) after one ``record_gaussian`` release per entry of
  ``extra_gaussian_noise_multipliers`` (as :func:`dpjax.calibrate_noise_multiplier` builds
  it), and the answer z satisfies ``tuned_epsilon(that ledger, delta, distribution, ...) <=
  total_epsilon`` as computed, with some z' > z (1 - relative_tolerance) above the target.
  Epsilon decreases as z grows (each order's per-run RDP does, and so the bound), so a
  doubling bracket then bisection certifies it.

  Raises:
    accounting.EssentiallyNoPrivacy: the target is met at ``min_noise_multiplier`` already.
    ValueError: bad arguments, or a target no noise can meet (the extra releases alone, or
      the selection's overhead log(E[K]) / (lambda - 1) + ..., spend it).
  """
  target = accounting.as_real_scalar('total_epsilon', total_epsilon)
  if not (math.isfinite(target) and target > 0):
    raise ValueError(f'Expected total_epsilon={target} to be finite and > 0')
  delta = accounting.check_delta(delta)
  sampling_prob = accounting.as_real_scalar('sampling_prob', sampling_prob)
  if not 0 < sampling_prob <= 1:
    raise ValueError(f'Expected 0 < {sampling_prob=} <= 1')
  steps = _check_positive_int('steps', steps)
  params = _check_distribution(distribution, eta, gamma, mu)
  relative_tolerance = accounting.as_real_scalar('relative_tolerance', relative_tolerance)
  if not 1e-9 <= relative_tolerance < 1:
    raise ValueError(f'Expected 1e-9 <= {relative_tolerance=} < 1')
  min_noise_multiplier = accounting.as_real_scalar('min_noise_multiplier', min_noise_multiplier)
  if not (math.isfinite(min_noise_multiplier) and min_noise_multiplier > 0):
    raise ValueError(f'Expected {min_noise_multiplier=} to be finite and > 0')
  extras = [accounting.as_real_scalar('extra_gaussian_noise_multipliers[]', z)
            for z in list(extra_gaussian_noise_multipliers)]
  if not all(math.isfinite(z) and z >= 0 for z in extras):
    raise ValueError(f'Expected finite extra_gaussian_noise_multipliers >= 0, got {extras}')

  epsilons: dict[float, float] = {}

  def epsilon_at(z: float) -> float:
    if z not in epsilons:
      ledger = accounting.PrivacyLedger(sampling, steps_per_epoch)
      for i, extra in enumerate(extras):
        ledger.record_gaussian(extra, f'extra_gaussian_{i}')
      ledger.record_steps(z, sampling_prob, steps)
      epsilons[z] = tuned_epsilon(ledger, delta, distribution, **params)
    return epsilons[z]

  if epsilon_at(min_noise_multiplier) <= target:
    raise accounting.EssentiallyNoPrivacy(
        f'tuned epsilon {target:g} at delta {delta:g} needs a per-run noise multiplier below '
        f'{min_noise_multiplier:g} (tuned epsilon there: {epsilons[min_noise_multiplier]:.3g})'
        ': essentially no privacy')
  high = max(1.0, min_noise_multiplier)
  while epsilon_at(high) > target:
    high *= 2
    if high > 2**30:
      raise ValueError(
          f'Cannot reach tuned epsilon {target:g} at {delta=} with any per-run noise '
          f'multiplier up to 2**30: the selection overhead (or the extra releases) alone '
          f'spend it; raise the target or lower the expected number of runs')
  low = max(high / 2, min_noise_multiplier)
  while epsilon_at(low) <= target:
    high, low = low, max(low / 2, min_noise_multiplier)
  while high - low > relative_tolerance * high:
    middle = (low + high) / 2
    if not low < middle < high:
      break
    if epsilon_at(middle) <= target:
      high = middle
    else:
      low = middle
  return high
