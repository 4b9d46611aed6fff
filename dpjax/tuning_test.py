"""Tests of the accounted hyperparameter tuning (Papernot & Steinke, ICLR 2022)."""

import math

from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant
import jax
import numpy as np
import pytest

from dpjax import accounting
from dpjax import tuning

ORDERS = np.asarray(accounting.RDP_ORDERS, np.float64)


def _paper_ledger(z=5.0, q=128 / 5218, steps=2038):
  ledger = accounting.PrivacyLedger('poisson')
  ledger.record_steps(z, q, steps)
  return ledger


# ---------------------------------------------------------------- closed forms and the bound


@pytest.mark.parametrize('gamma', [0.05, 0.3, 0.9])
def test_expected_num_runs_closed_forms(gamma):
  assert tuning.expected_num_runs(eta=1, gamma=gamma) == pytest.approx(1 / gamma, rel=1e-12)
  log_series = (1 / gamma - 1) / math.log(1 / gamma)
  assert tuning.expected_num_runs(eta=0, gamma=gamma) == pytest.approx(log_series, rel=1e-12)
  # Continuous at eta = 0, and equal to the mean of the pmf for eta < 0 too.
  assert tuning.expected_num_runs(eta=1e-9, gamma=gamma) == pytest.approx(log_series, rel=1e-6)
  for eta in (-0.5, 0.0, 0.5, 1.0, 3.0):
    pmf = tuning.tnb_pmf(eta, gamma, 4000)
    assert pmf.sum() == pytest.approx(1, abs=1e-9)
    assert np.arange(pmf.size) @ pmf == pytest.approx(
        tuning.expected_num_runs(eta=eta, gamma=gamma), rel=1e-8)
  assert tuning.expected_num_runs('poisson', mu=7.5) == 7.5


def test_geometric_pmf_and_gamma_for_mean():
  pmf = tuning.tnb_pmf(1, 0.25, 10)
  assert pmf[1:] == pytest.approx([0.25 * 0.75**(k - 1) for k in range(1, 11)], rel=1e-12)
  for eta in (-0.5, 0, 1, 2.5):
    gamma = tuning.tnb_gamma_for_mean(eta, 10)
    assert tuning.expected_num_runs(eta=eta, gamma=gamma) == pytest.approx(10, rel=1e-9)
    assert tuning.expected_num_runs(eta=eta, gamma=gamma) <= 10 * (1 + 1e-12)


def test_tnb_bound_equals_the_theorem_by_hand():
  # Gaussian mechanism with noise sigma: eps(lambda) = lambda / (2 sigma^2).
  orders = np.array([1.5, 2.0, 4.0, 8.0, 16.0])
  sigma = 3.0
  eps = orders / (2 * sigma**2)
  eta, gamma = 0.5, 0.2
  mean = eta * (1 - gamma) / (gamma * (1 - gamma**eta))
  overhead = min((1 + eta) * (1 - 1 / lh) * lh / (2 * sigma**2) + (1 + eta) * math.log(1 / gamma) / lh
                 for lh in orders)
  by_hand = [order / (2 * sigma**2) + overhead + math.log(mean) / (order - 1) for order in orders]
  by_hand = [min(by_hand[i:]) for i in range(len(by_hand))]  # Monotone in the order.
  got = tuning.tnb_selection_rdp(orders, eps, eta=eta, gamma=gamma)
  assert got == pytest.approx(by_hand, rel=1e-12)
  # The monotone step matters at the small orders here (log(E[K]) / (lambda - 1) is large).
  assert got[0] < orders[0] / (2 * sigma**2) + overhead + math.log(mean) / (orders[0] - 1)
  # Order 1 is a valid lambda_hat (the eps_hat term vanishes) but no lambda: inf there.
  with_one = tuning.tnb_selection_rdp(np.r_[1.0, orders], np.r_[0.1, eps], eta=eta, gamma=gamma)
  assert with_one[0] == math.inf or with_one[0] <= got[0]


def test_poisson_bound_equals_the_theorem_by_hand():
  orders = np.array([2.0, 4.0, 8.0, 16.0])
  eps = orders / (2 * 4.0**2)
  mu = 6.0
  by_hand = []
  for order, e in zip(orders, eps):
    delta_hat, _ = rdp_privacy_accountant.compute_delta(orders, eps, math.log1p(1 / (order - 1)))
    by_hand.append(e + mu * delta_hat + math.log(mu) / (order - 1))
  by_hand = [min(by_hand[i:]) for i in range(len(by_hand))]
  assert tuning.poisson_selection_rdp(orders, eps, mu=mu) == pytest.approx(by_hand, rel=1e-12)


@pytest.mark.parametrize('eta,mean', [(0, 5), (1, 10), (0.5, 20), (2, 3)])
def test_tnb_matches_dp_accounting_repeat_and_select_on_a_real_ledger(eta, mean):
  """dp-accounting's RepeatAndSelectDpEvent (by an author of the paper) parametrises the TNB by
  its mean; its gamma is found by bisection to 1e-9, hence the tolerance."""
  ledger = _paper_ledger()
  curve = tuning.ledger_rdp_curve(ledger)
  gamma = rdp_privacy_accountant._gamma_truncated_negative_binomial(eta, mean)
  reference = rdp_privacy_accountant._compute_rdp_repeat_and_select(ORDERS, curve, mean, eta)
  assert tuning.tnb_selection_rdp(ORDERS, curve, eta=eta, gamma=gamma) == pytest.approx(
      reference, rel=1e-8)
  accountant = rdp_privacy_accountant.RdpAccountant(list(ORDERS))
  accountant.compose(dp_event.RepeatAndSelectDpEvent(ledger.dp_event(), mean, eta))
  assert tuning.tuned_epsilon(ledger, 1e-5, eta=eta, gamma=gamma) == pytest.approx(
      accountant.get_epsilon(1e-5), rel=1e-8)


@pytest.mark.parametrize('mu', [1.0, 5.0, 30.0])
def test_poisson_matches_dp_accounting_and_is_never_above_it(mu):
  ledger = _paper_ledger(z=3.0)
  curve = tuning.ledger_rdp_curve(ledger)
  reference = rdp_privacy_accountant._compute_rdp_repeat_and_select(ORDERS, curve, mu, math.inf)
  ours = tuning.poisson_selection_rdp(ORDERS, curve, mu=mu)
  assert np.all(ours <= reference * (1 + 1e-12))
  assert ours == pytest.approx(tuning._monotone(ORDERS, reference), rel=1e-12)
  accountant = rdp_privacy_accountant.RdpAccountant(list(ORDERS))
  accountant.compose(dp_event.RepeatAndSelectDpEvent(ledger.dp_event(), mu, math.inf))
  assert tuning.tuned_epsilon(ledger, 1e-5, 'poisson', mu=mu) == pytest.approx(
      accountant.get_epsilon(1e-5), rel=1e-9)


def test_ledger_curve_gives_the_ledger_rdp_epsilon():
  ledger = _paper_ledger()
  epsilon, _ = rdp_privacy_accountant.compute_epsilon(ORDERS, tuning.ledger_rdp_curve(ledger), 1e-4)
  assert epsilon == pytest.approx(ledger.epsilon(1e-4, 'rdp'), rel=1e-12)


def test_tuned_epsilon_is_monotone_and_costs_more_than_one_run():
  ledger = _paper_ledger()
  single = ledger.epsilon(1e-5, 'rdp')
  by_mean = [tuning.tuned_epsilon(ledger, 1e-5, eta=1, gamma=1 / m) for m in (2, 5, 10, 50)]
  assert single < by_mean[0] and by_mean == sorted(by_mean)
  # A few times one run's epsilon, far from the 50 runs' composition.
  assert by_mean[-1] < 4 * single
  by_noise = [tuning.tuned_epsilon(_paper_ledger(z=z), 1e-5, eta=0, gamma=0.1)
              for z in (2.0, 4.0, 8.0)]
  assert by_noise == sorted(by_noise, reverse=True)
  by_mu = [tuning.tuned_epsilon(ledger, 1e-5, 'poisson', mu=mu) for mu in (1, 5, 20)]
  assert by_mu == sorted(by_mu)


def test_several_configurations_take_the_per_order_maximum():
  small, large = _paper_ledger(z=6.0), _paper_ledger(z=4.0, steps=1000)
  both = tuning.tuned_epsilon([small, large], 1e-5, eta=1, gamma=0.1)
  assert both >= max(tuning.tuned_epsilon(small, 1e-5, eta=1, gamma=0.1),
                     tuning.tuned_epsilon(large, 1e-5, eta=1, gamma=0.1))
  orders, curve = tuning.per_run_curve([small, large])
  assert np.array_equal(curve, np.maximum(tuning.ledger_rdp_curve(small),
                                          tuning.ledger_rdp_curve(large)))
  shuffled = accounting.PrivacyLedger('shuffled')
  shuffled.record_steps(5.0, 0.1, 100)
  with pytest.raises(ValueError, match='one neighbouring relation'):
    tuning.per_run_curve([small, shuffled])


def test_noiseless_run_is_infinite_and_bad_arguments_are_refused():
  ledger = accounting.PrivacyLedger('poisson')
  ledger.record_steps(0.0, 0.1, 10)
  assert tuning.tuned_epsilon(ledger, 1e-5, eta=1, gamma=0.1) == math.inf
  good = _paper_ledger()
  for kwargs, match in [
      (dict(eta=-1, gamma=0.1), 'eta'), (dict(eta=1, gamma=1.0), 'gamma'),
      (dict(eta=1, gamma=0.0), 'gamma'), (dict(eta=True, gamma=0.1), 'bool'),
      (dict(eta=1), 'needs eta and gamma'), (dict(eta=1, gamma=0.1, mu=3), 'mu'),
      (dict(eta=float('nan'), gamma=0.1), 'eta')]:
    with pytest.raises(ValueError, match=match):
      tuning.tuned_epsilon(good, 1e-5, **kwargs)
  with pytest.raises(ValueError, match='mu'):
    tuning.tuned_epsilon(good, 1e-5, 'poisson', mu=0.5)
  with pytest.raises(ValueError, match='distribution'):
    tuning.tuned_epsilon(good, 1e-5, 'geometric', eta=1, gamma=0.1)
  with pytest.raises(ValueError, match='delta'):
    tuning.tuned_epsilon(good, 0.0, eta=1, gamma=0.1)
  with pytest.raises(ValueError, match='orders >= 1'):
    tuning.tnb_selection_rdp([0.5, 2.0], [0.1, 0.2], eta=1, gamma=0.1)
  with pytest.raises(ValueError, match='same length'):
    tuning.tnb_selection_rdp([2.0, 3.0], [0.1], eta=1, gamma=0.1)
  with pytest.raises(ValueError, match='PrivacyLedger'):
    tuning.tuned_epsilon('ledger', 1e-5, eta=1, gamma=0.1)


# ---------------------------------------------------------------- the inverse


@pytest.mark.parametrize('distribution,params', [('tnb', dict(eta=1, gamma=0.1)),
                                                 ('tnb', dict(eta=0, gamma=0.05)),
                                                 ('poisson', dict(mu=8))])
def test_calibration_certifies_the_total_target(distribution, params):
  q, steps, target, delta = 128 / 5218, 500, 2.0, 1e-5
  z = tuning.calibrate_per_run_noise_multiplier(target, delta, q, steps, distribution,
                                                relative_tolerance=1e-3, **params)
  ledger = accounting.PrivacyLedger('poisson')
  ledger.record_steps(z, q, steps)
  assert tuning.tuned_epsilon(ledger, delta, distribution, **params) <= target
  slightly_less = accounting.PrivacyLedger('poisson')
  slightly_less.record_steps(z * (1 - 2e-3), q, steps)
  assert tuning.tuned_epsilon(slightly_less, delta, distribution, **params) > target
  # Tuning needs more noise per run than one run at the same total epsilon.
  assert z > accounting.calibrate_noise_multiplier(target, delta, q, steps, 'rdp')


def test_calibration_refuses_targets_the_overhead_alone_spends():
  # Even with no per-run leakage, log(E[K]) / (lambda - 1) + (1 + eta) log(1/gamma) /
  # lambda_hat, converted at delta 1e-5, is ~0.024 > 0.01 (the largest order is 1024).
  with pytest.raises(ValueError, match='selection overhead'):
    tuning.calibrate_per_run_noise_multiplier(0.01, 1e-5, 0.01, 100, eta=1, gamma=0.01)
  with pytest.raises(accounting.EssentiallyNoPrivacy):
    tuning.calibrate_per_run_noise_multiplier(1e4, 1e-5, 0.01, 10, eta=1, gamma=0.5)


# ---------------------------------------------------------------- the secret draw of K


@pytest.mark.parametrize('eta,gamma', [(-0.5, 0.2), (0, 0.1), (1, 0.1), (2, 0.3)])
def test_sampler_matches_the_distribution(eta, gamma):
  rng = np.random.default_rng(20220425)  # A test seed, not a secret.
  draws = np.array([tuning.draw_num_runs(rng, eta=eta, gamma=gamma) for _ in range(20_000)])
  assert draws.min() >= 1
  pmf = tuning.tnb_pmf(eta, gamma, 5000)
  mean = tuning.expected_num_runs(eta=eta, gamma=gamma)
  std = math.sqrt(np.arange(pmf.size)**2 @ pmf - mean**2)
  assert abs(draws.mean() - mean) < 5 * std / math.sqrt(draws.size)
  for k in (1, 2, 3):
    p = pmf[k]
    assert abs(np.mean(draws == k) - p) < 5 * math.sqrt(p * (1 - p) / draws.size)


def test_poisson_sampler_mean_and_zero():
  rng = np.random.default_rng(7)
  draws = np.array([tuning.draw_num_runs(rng, 'poisson', mu=2.0) for _ in range(20_000)])
  assert abs(draws.mean() - 2.0) < 5 * math.sqrt(2.0 / draws.size)
  assert abs(np.mean(draws == 0) - math.exp(-2)) < 0.01  # K = 0: release nothing.


def test_sampler_secret_sources():
  fresh = {tuning.draw_num_runs(eta=1, gamma=0.01) for _ in range(20)}  # OS entropy.
  assert len(fresh) > 1
  key = jax.random.key(3)
  assert (tuning.draw_num_runs(key, eta=1, gamma=0.01)
          == tuning.draw_num_runs(key, eta=1, gamma=0.01))
  with pytest.raises(ValueError, match='integer seed'):
    tuning.draw_num_runs(3, eta=1, gamma=0.1)
  with pytest.raises(ValueError, match='Generator'):
    tuning.draw_num_runs(np.random.RandomState(0), eta=1, gamma=0.1)


# ---------------------------------------------------------------- an exact check of the bound


def _renyi(p, q, order):
  """D_order(p || q) of two finite distributions (q > 0 where p > 0)."""
  from scipy.special import logsumexp
  mask = p > 0
  return logsumexp(order * np.log(p[mask]) + (1 - order) * np.log(q[mask])) / (order - 1)


def _symmetric_rdp(p, q, orders):
  return np.array([max(_renyi(p, q, a), _renyi(q, p, a)) for a in orders])


def _best_of_random_k(pmf, pgf):
  """Law of the best output when K runs each output s in {0..m-1} with probability pmf[s]
  (higher is better) and K has probability generating function pgf: P(best <= s) =
  E[F(s)^K] = pgf(F(s)). Entry 0 is 'nothing released' (K = 0), probability pgf(0)."""
  cdf = np.concatenate([[0.0], np.cumsum(pmf)])
  cdf[-1] = 1.0
  at = np.array([pgf(x) for x in cdf])
  return np.concatenate([[at[0]], np.diff(at)])


def _tnb_pgf(eta, gamma):
  if eta == 0:
    return lambda x: math.log1p(-(1 - gamma) * x) / math.log(gamma)
  return lambda x: math.expm1(-eta * math.log1p(-(1 - gamma) * x)) / math.expm1(-eta * math.log(gamma))


def _scores(shift, levels=6, sigma=1.0):
  """A discretised Gaussian score: N(shift, sigma^2) rounded into `levels` ordered bins."""
  from scipy import stats
  edges = np.linspace(-1.5, 1.5, levels - 1)
  cdf = np.concatenate([[0.0], stats.norm.cdf(edges, loc=shift, scale=sigma), [1.0]])
  return np.diff(cdf)


EXACT_ORDERS = np.array([1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0])


@pytest.mark.parametrize('eta,gamma', [(-0.5, 0.1), (0, 0.05), (1, 0.1), (3, 0.3)])
def test_exact_renyi_divergence_of_the_release_is_within_the_bound(eta, gamma):
  """One run outputs a noisy score on neighbouring data sets (the score moves by 0.5 noise
  units); the release is the best of K ~ TNB runs. Its exact Renyi divergence, in both
  directions, stays within Theorem 2's bound on the exact per-run curve; the best of a FIXED
  number of runs, about E[K], exceeds the bound at high orders: randomising K is what buys
  the small overhead."""
  p, q = _scores(0.5), _scores(0.0)
  per_run = _symmetric_rdp(p, q, EXACT_ORDERS)
  bound = tuning.tnb_selection_rdp(EXACT_ORDERS, per_run, eta=eta, gamma=gamma)
  pgf = _tnb_pgf(eta, gamma)
  release = _symmetric_rdp(_best_of_random_k(p, pgf)[1:], _best_of_random_k(q, pgf)[1:],
                           EXACT_ORDERS)
  assert np.all(release <= bound)
  assert np.all(release >= per_run[0] * 0)  # Sanity: divergences are >= 0.
  fixed_k = max(1, round(tuning.expected_num_runs(eta=eta, gamma=gamma)))
  fixed = _symmetric_rdp(_best_of_random_k(p, lambda x: x**fixed_k)[1:],
                         _best_of_random_k(q, lambda x: x**fixed_k)[1:], EXACT_ORDERS)
  if fixed_k >= 8:
    assert np.any(fixed > bound)
  assert fixed[-1] > release[-1]


@pytest.mark.parametrize('mu', [1.0, 4.0, 12.0])
def test_exact_renyi_divergence_of_a_poisson_release_is_within_the_bound(mu):
  p, q = _scores(0.5), _scores(0.0)
  per_run = _symmetric_rdp(p, q, EXACT_ORDERS)
  bound = tuning.poisson_selection_rdp(EXACT_ORDERS, per_run, mu=mu)
  pgf = lambda x: math.exp(mu * (x - 1))
  release = _symmetric_rdp(_best_of_random_k(p, pgf), _best_of_random_k(q, pgf), EXACT_ORDERS)
  assert np.all(release <= bound)
