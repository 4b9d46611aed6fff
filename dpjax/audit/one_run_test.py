"""Tests of the one-run canary audit, including the broken-mechanism control."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special
import scipy.stats

import dpjax
from dpjax.audit import one_run


def _all_correct_bound_pure_dp(num_guesses, confidence):
  # delta = 0, v = r: P[B >= r] = q^r = 1 - confidence, q = expit(eps).
  success = (1 - confidence) ** (1 / num_guesses)
  return float(scipy.special.logit(success))


def _p_value_by_definition(r, v, m, epsilon, delta):
  """The theorem's right-hand side with the max over ALL i = 1..m."""
  success = scipy.special.expit(epsilon)
  binomial = scipy.stats.binom(r, success)
  tail = sum(binomial.pmf(w) for w in range(v, r + 1))
  slack = max(sum(binomial.pmf(w) for w in range(max(v - i, 0), v)) / i
              for i in range(1, m + 1))
  return min(tail + 2 * m * delta * slack, 1.0)


class TestLowerBound:

  @pytest.mark.parametrize('num_guesses', [10, 100, 1000])
  def test_all_correct_pure_dp_closed_form(self, num_guesses):
    bound = one_run.one_run_lower_bound(num_guesses, num_guesses, 1000, 0.0)
    assert bound == pytest.approx(
        _all_correct_bound_pure_dp(num_guesses, 0.95), abs=1e-6)

  def test_all_correct_increases_with_guesses(self):
    bounds = [one_run.one_run_lower_bound(r, r, 2000, 1e-5)
              for r in (10, 50, 200, 1000, 2000)]
    assert np.all(np.diff(bounds) > 0)
    # delta > 0 only weakens the bound.
    assert bounds[2] <= _all_correct_bound_pure_dp(200, 0.95)

  def test_half_correct_gives_zero(self):
    assert one_run.one_run_lower_bound(1000, 500, 1000, 1e-5) == 0.0
    assert one_run.one_run_lower_bound(1000, 520, 1000, 1e-5) == 0.0
    assert one_run.one_run_lower_bound(100, 0, 1000, 1e-5) == 0.0

  def test_monotone_in_correct_count(self):
    bounds = [one_run.one_run_lower_bound(200, v, 1000, 1e-5)
              for v in range(100, 201, 10)]
    assert np.all(np.diff(bounds) >= 0)
    assert bounds[-1] > bounds[5] > 0

  def test_decreases_with_delta_and_confidence(self):
    base = one_run.one_run_lower_bound(400, 380, 1000, 0.0)
    with_delta = one_run.one_run_lower_bound(400, 380, 1000, 1e-4)
    more_confident = one_run.one_run_lower_bound(400, 380, 1000, 0.0,
                                                 confidence=0.99)
    assert with_delta < base and more_confident < base

  @pytest.mark.parametrize('r,v,m,epsilon,delta', [
      (50, 40, 60, 0.7, 1e-3),
      (30, 30, 100, 2.0, 1e-4),
      (40, 25, 40, 0.1, 1e-2),
  ])
  def test_p_value_matches_definition(self, r, v, m, epsilon, delta):
    assert one_run.one_run_p_value(r, v, m, epsilon, delta) == pytest.approx(
        _p_value_by_definition(r, v, m, epsilon, delta), rel=1e-9, abs=1e-12)

  def test_bound_is_the_rejection_boundary(self):
    r, v, m, delta = 300, 240, 1000, 1e-5
    bound = one_run.one_run_lower_bound(r, v, m, delta)
    assert bound > 0
    # Rejected (p <= 5%) at the bound, not rejected just above it.
    assert one_run.one_run_p_value(r, v, m, bound, delta) <= 0.05 + 1e-9
    assert one_run.one_run_p_value(r, v, m, bound + 1e-3, delta) > 0.05
    # Independent check of the boundary with scipy.stats.binom (delta = 0).
    bound_pure = one_run.one_run_lower_bound(r, v, m, 0.0)
    success = scipy.special.expit(bound_pure)
    assert scipy.stats.binom.sf(v - 1, r, success) == pytest.approx(0.05,
                                                                    rel=1e-5)

  def test_coverage_under_randomised_response(self):
    """eps-randomised response is exactly eps-DP: the bound exceeds eps in
    at most 5% of audits (here 200 audits of 1000 guesses each)."""
    epsilon, num_trials, num_guesses = 1.0, 200, 1000
    correct = jax.random.bernoulli(jax.random.key(7),
                                   scipy.special.expit(epsilon),
                                   (num_trials, num_guesses)).sum(axis=1)
    bounds = np.array([one_run.one_run_lower_bound(num_guesses, int(v),
                                                   num_guesses, 0.0)
                       for v in np.asarray(correct)])
    # P[exceed] <= 0.05; 0.1 leaves room for 200 trials.
    assert np.mean(bounds > epsilon) <= 0.1
    # And the audit is not vacuous: it recovers most of eps.
    assert np.median(bounds) > 0.7

  def test_invalid_counts_raise(self):
    with pytest.raises(ValueError, match='num_correct'):
      one_run.one_run_lower_bound(10, 11, 100, 1e-5)
    with pytest.raises(ValueError, match='num_guesses'):
      one_run.one_run_lower_bound(101, 10, 100, 1e-5)
    with pytest.raises(ValueError, match='confidence'):
      one_run.one_run_lower_bound(10, 5, 100, 1e-5, confidence=1.0)


class TestGuessesAndInclusion:

  def test_canary_inclusion_is_fair_and_keyed(self):
    key = jax.random.key(3)
    included = np.asarray(one_run.canary_inclusion(key, 10_000))
    assert included.dtype == bool and included.shape == (10_000,)
    np.testing.assert_array_equal(
        included, np.asarray(one_run.canary_inclusion(key, 10_000)))
    assert scipy.stats.binomtest(int(included.sum()), 10_000, 0.5).pvalue > 1e-3
    other = np.asarray(one_run.canary_inclusion(jax.random.key(4), 10_000))
    assert np.mean(other == included) == pytest.approx(0.5, abs=0.03)

  def test_guesses_from_scores_hand_made(self):
    scores = np.array([0.3, 5.0, -1.0, 2.0, 0.0, 0.0])
    guesses = one_run.guesses_from_scores(scores, k_pos=2, k_neg=2)
    np.testing.assert_array_equal(guesses, [0, 1, -1, 1, 0, -1])
    # Ties broken by index: of the two zeros, the later one is "lowest".
    np.testing.assert_array_equal(
        one_run.guesses_from_scores(scores, 0, 0), np.zeros(6))
    np.testing.assert_array_equal(
        one_run.guesses_from_scores(scores, 3, 3), [1, 1, -1, 1, -1, -1])
    with pytest.raises(ValueError, match='k_pos'):
      one_run.guesses_from_scores(scores, 4, 3)

  def test_audit_from_scores_counts(self):
    scores = np.array([9.0, 8.0, 7.0, 1.0, 0.0, -1.0])
    included = np.array([True, True, False, True, False, False])
    result = one_run.audit_from_scores(scores, included, 1e-5, k_pos=2,
                                       k_neg=3)
    # Guessed in: 0, 1 (right); guessed out: 3 (wrong), 4, 5 (right).
    assert result['num_guesses'] == 5 and result['num_correct'] == 4
    assert result['guess_accuracy'] == 0.8
    assert result['epsilon_lower_bound'] == one_run.one_run_lower_bound(
        5, 4, 6, 1e-5)

  def test_dirac_canary_scores(self):
    initial = {'a': jnp.zeros(3), 'b': jnp.zeros((2,))}
    final = {'a': jnp.array([1.0, 2.0, 3.0]), 'b': jnp.array([4.0, 5.0])}
    np.testing.assert_allclose(
        one_run.dirac_canary_scores(initial, final, [4, 0]), [5.0, 1.0])


# Negative control: a white-box one-run audit with Dirac canaries on a tiny
# logistic regression trained with the library's DP-SGD and Poisson sampler.
# Canary j is an example whose gradient is -canary_norm * e_j (a parameter
# direction of its own); its score is the final change of parameter j.
NUM_CANARIES = 1000
NUM_DATA = 200
SAMPLING_PROB = 0.5
NUM_STEPS = 10
DELTA = 1e-5
CLAIMED_EPSILON = 1.0
# Calibrated offline with dpjax.calibrate_noise_multiplier(1.0, 1e-5,
# 0.5, 10) (6.178); the test re-checks that the ledger claims <= 1.
NOISE_MULTIPLIER = 6.2
L2_NORM_CLIP = 1.0
K_GUESS = 200  # Guesses per side, fixed before training.


@jax.jit
def _draw_canaries_and_data(key):
  inclusion_key, features_key, teacher_key = jax.random.split(key, 3)
  included = one_run.canary_inclusion(inclusion_key, NUM_CANARIES)
  features = jax.random.normal(features_key, (NUM_DATA, NUM_CANARIES))
  features = features / jnp.sqrt(NUM_CANARIES)  # Gradient norms below 1.
  labels = features @ jax.random.normal(teacher_key, (NUM_CANARIES,)) > 0
  return included, features, labels


@functools.cache
def _audit_run(mechanism: str, canary_norm: float) -> dict:
  """Trains once with ``mechanism`` and audits it."""
  data_key, sampler_key, noise_key = jax.random.split(jax.random.key(0), 3)
  included, features, labels = jax.device_get(
      _draw_canaries_and_data(data_key))
  # The training set: the data, then the included canaries (host arrays).
  canary_coordinates = np.flatnonzero(included)
  num_examples = NUM_DATA + len(canary_coordinates)
  all_features = np.zeros((num_examples, NUM_CANARIES), np.float32)
  all_features[:NUM_DATA] = features
  all_labels = np.zeros(num_examples, np.float32)
  all_labels[:NUM_DATA] = labels
  canary_gradients = np.zeros((num_examples, NUM_CANARIES), np.float32)
  canary_gradients[NUM_DATA + np.arange(len(canary_coordinates)),
                   canary_coordinates] = -canary_norm

  sampler = dpjax.PoissonSampler(sampler_key, num_examples, SAMPLING_PROB)
  if mechanism == 'no_clipping':  # The bug: noise added to an unclipped sum.
    privatise = dpjax.gaussian_noise(L2_NORM_CLIP, noise_multiplier=NOISE_MULTIPLIER,
                                     key=noise_key,
                                     expected_batch_size=sampler.expected_batch_size)
  else:
    noise = 0.0 if mechanism == 'no_noise' else NOISE_MULTIPLIER
    privatise = dpjax.dp_sgd(L2_NORM_CLIP, noise_multiplier=noise, key=noise_key,
                             expected_batch_size=sampler.expected_batch_size)
  optimiser = optax.chain(privatise, optax.sgd(learning_rate=1.0))
  initial_params = {'w': jnp.zeros(NUM_CANARIES)}

  @jax.jit
  def train_step(params, opt_state, batch_features, batch_labels,
                 batch_canary_gradients, mask):
    residual = jax.nn.sigmoid(batch_features @ params['w']) - batch_labels
    per_example = residual[:, None] * batch_features + batch_canary_gradients
    if mechanism == 'no_clipping':
      summed = jnp.sum(jnp.where(mask[:, None], per_example, 0.0), axis=0)
      updates, opt_state = optimiser.update({'w': summed}, opt_state, params)
    else:
      updates, opt_state = optimiser.update(
          dpjax.PerExampleGrads({'w': per_example}, mask), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = initial_params, optimiser.init(initial_params)
  for step in range(NUM_STEPS):
    batch = sampler.batch(step)  # Padding rows gather as zeros (read from no example); masked.
    batch_features, batch_labels, batch_canaries = batch.gather(
        (all_features, all_labels, canary_gradients))
    params, opt_state = train_step(
        params, opt_state, batch_features, batch_labels, batch_canaries, batch.mask)
  scores = one_run.dirac_canary_scores(initial_params, params,
                                       np.arange(NUM_CANARIES))
  return one_run.audit_from_scores(scores, included, DELTA, K_GUESS, K_GUESS)


class TestNegativeControl:

  def test_ledger_claims_the_epsilon(self):
    ledger = dpjax.PrivacyLedger('poisson')
    ledger.record_steps(NOISE_MULTIPLIER, SAMPLING_PROB, NUM_STEPS)
    assert 0.9 < ledger.epsilon(DELTA) <= CLAIMED_EPSILON

  @pytest.mark.parametrize('canary_norm', [1.0, 1000.0])
  def test_correct_dp_sgd_stays_below_claim(self, canary_norm):
    result = _audit_run('correct', canary_norm)
    assert result['epsilon_lower_bound'] < CLAIMED_EPSILON
    assert result['num_guesses'] == 2 * K_GUESS

  def test_noise_off_is_caught(self):
    result = _audit_run('no_noise', 1.0)
    assert result['epsilon_lower_bound'] > CLAIMED_EPSILON
    assert result['guess_accuracy'] > 0.95

  def test_clipping_off_with_huge_canary_is_caught(self):
    result = _audit_run('no_clipping', 1000.0)
    assert result['epsilon_lower_bound'] > CLAIMED_EPSILON
    assert result['guess_accuracy'] > 0.95


class TestAttainableMaximum:
  """The audit can only refute a claim below the bound it reaches with every guess right."""

  def test_maximum_for_1000_canaries_and_100_plus_100_guesses(self):
    # delta = 0: all r guesses right, P[B = r] = expit(eps)^r = 0.05, so eps = logit(0.05^(1/r)).
    assert one_run.max_lower_bound(200, 1000, 0.0) == pytest.approx(
        _all_correct_bound_pure_dp(200, 0.95), abs=1e-6)
    assert _all_correct_bound_pure_dp(200, 0.95) == pytest.approx(4.194, abs=1e-3)
    attainable = one_run.max_lower_bound(200, 1000, 1e-5)
    assert attainable == pytest.approx(4.17, abs=0.005)  # What the run's default audit can show.
    for correct in (100, 150, 199, 200):
      assert one_run.one_run_lower_bound(200, correct, 1000, 1e-5) <= attainable

  def test_maximum_grows_with_the_guesses(self):
    # guesses_needed's bisection relies on it.
    for num_canaries in (10, 60):
      for delta in (0.0, 1e-5, 1e-3):
        maxima = [one_run.max_lower_bound(r, num_canaries, delta)
                  for r in range(1, num_canaries + 1)]
        assert all(b >= a - 1e-6 for a, b in zip(maxima, maxima[1:])), (num_canaries, delta)

  def test_guesses_needed_closed_form_at_epsilon_8(self):
    # delta = 0: max(r) > 8 iff expit(8)^r > 0.05, i.e. r > log(0.05) / log(expit(8)) = 8931.6.
    threshold = np.log(0.05) / np.log(scipy.special.expit(8.0))
    assert 8931 < threshold < 8932
    assert one_run.guesses_needed(8.0, 0.0, 10_000) == 8932
    assert one_run.max_lower_bound(8932, 10_000, 0.0) > 8.0
    assert one_run.guesses_needed(8.0, 0.0, 8931) is None  # Fewer canaries than guesses needed.
    # The run's default budget: no number of guesses among 1,000 canaries can test 8.
    assert one_run.guesses_needed(8.0, 1e-5, 1000) is None
    assert one_run.max_lower_bound(1000, 1000, 1e-5) == pytest.approx(5.78, abs=0.01)

  def test_guesses_needed_is_the_fewest(self):
    for epsilon in (1.0, 4.2, 5.0):
      needed = one_run.guesses_needed(epsilon, 1e-5, 1000)
      assert one_run.max_lower_bound(needed, 1000, 1e-5) > epsilon
      assert one_run.max_lower_bound(needed - 1, 1000, 1e-5) <= epsilon
    assert one_run.guesses_needed(4.2, 1e-5, 1000) > 200  # More than the old 100 + 100.
    assert one_run.guesses_needed(float('inf'), 1e-5, 1000) is None
    with pytest.raises(ValueError):
      one_run.guesses_needed(-1.0, 1e-5, 1000)

  def test_audit_reports_the_maximum_and_whether_it_can_test_the_claim(self):
    included = np.arange(1000) % 2 == 0
    scores = included.astype(float)  # A perfect attack: every guess right.
    plain = one_run.audit_from_scores(scores, included, 1e-5, 100, 100)
    assert plain['epsilon_lower_bound'] == pytest.approx(plain['epsilon_lower_bound_max'])
    assert plain['epsilon_lower_bound_max'] == pytest.approx(4.17, abs=0.005)
    assert 'verdict' not in plain
    caught = one_run.audit_from_scores(scores, included, 1e-5, 100, 100, claimed_epsilon=1.0)
    assert caught['can_test_claim'] and caught['verdict'].startswith('CLAIM REFUTED')
    untestable = one_run.audit_from_scores(scores, included, 1e-5, 100, 100,
                                           claimed_epsilon=8.0)
    assert not untestable['can_test_claim']
    assert untestable['verdict'].startswith('CANNOT TEST the claimed epsilon 8')
    chance = one_run.audit_from_scores(np.zeros(1000), included, 1e-5, 100, 100,
                                       claimed_epsilon=1.0)
    assert chance['can_test_claim'] and chance['verdict'].startswith('consistent')

  def test_canary_audit_chooses_guesses_that_can_test_the_claim(self):
    from dpjax.audit import canaries
    assert canaries.choose_guesses(1000, 1.0, 1e-5) == (100, 100)  # The default suffices.
    assert canaries.choose_guesses(1000, None, 1e-5) == (100, 100)
    k_pos, k_neg = canaries.choose_guesses(1000, 4.2, 1e-5)
    assert k_pos + k_neg == one_run.guesses_needed(4.2, 1e-5, 1000) > 200
    assert one_run.max_lower_bound(k_pos + k_neg, 1000, 1e-5) > 4.2
    # Untestable: guess on every canary (the highest maximum), and say so.
    assert canaries.choose_guesses(1000, 8.0, 1e-5) == (500, 500)
    params = {'w': np.zeros(1000, np.float32)}
    made = canaries.make_gradient_canaries(jax.random.key(0), params, 1000)
    result = canaries.canary_audit(made, params, 1e-5, claimed_epsilon=8.0)
    assert result['num_guesses'] == 1000 and not result['can_test_claim']
    assert 'CANNOT TEST' in result['verdict']
    assert canaries.canary_audit(made, params, 1e-5, 100)['num_guesses'] == 200
