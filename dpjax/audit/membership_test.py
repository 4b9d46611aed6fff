"""Tests of the membership-inference metrics and attacks."""

import numpy as np
import pytest
import scipy.stats

from dpjax.audit import membership

_norm = scipy.stats.norm


# Test inputs (not private data) come from seeded NumPy generators: JAX would
# recompile its samplers for every shape.


def _gaussian_scores(seed, num_each, shift):
  """Members ~ N(shift, 1), non-members ~ N(0, 1)."""
  rng = np.random.default_rng(seed)
  scores = np.concatenate([rng.normal(size=num_each) + shift,
                           rng.normal(size=num_each)])
  is_member = np.r_[np.ones(num_each, bool), np.zeros(num_each, bool)]
  return scores, is_member


class TestMetrics:

  @pytest.mark.parametrize('shift', [0.5, 1.0, 2.0])
  def test_gaussian_shift_closed_forms(self, shift):
    scores, is_member = _gaussian_scores(1, 20_000, shift)
    # AUC = P(X + shift > Y) = Phi(shift / sqrt 2).
    assert membership.auc(scores, is_member) == pytest.approx(
        _norm.cdf(shift / np.sqrt(2)), abs=0.01)
    # TPR at FPR f: threshold Phi^-1(1 - f), TPR = 1 - Phi(t - shift).
    target = 0.01
    expected_tpr = _norm.sf(_norm.isf(target) - shift)
    assert membership.tpr_at_fpr(scores, is_member, target) == pytest.approx(
        expected_tpr, abs=0.03)
    # Best threshold is shift / 2: advantage = 2 Phi(shift / 2) - 1.
    assert membership.advantage(scores, is_member) == pytest.approx(
        2 * _norm.cdf(shift / 2) - 1, abs=0.02)

  def test_perfect_separation(self):
    scores = np.array([3.0, 2.5, 2.0, -1.0, -2.0])
    is_member = np.array([True, True, True, False, False])
    assert membership.auc(scores, is_member) == 1.0
    assert membership.tpr_at_fpr(scores, is_member, 0.0) == 1.0
    assert membership.advantage(scores, is_member) == 1.0
    # Reversed scores: the worst attack.
    assert membership.auc(-scores, is_member) == 0.0

  def test_identical_distributions(self):
    scores, is_member = _gaussian_scores(2, 5_000, 0.0)
    assert membership.auc(scores, is_member) == pytest.approx(0.5, abs=0.02)
    assert membership.advantage(scores, is_member) < 0.05
    # All scores tied: exactly chance, ties counted half.
    tied = np.zeros(10)
    assert membership.auc(tied, np.arange(10) < 4) == 0.5
    assert membership.advantage(tied, np.arange(10) < 4) == 0.0
    assert membership.tpr_at_fpr(tied, np.arange(10) < 4, 0.5) == 0.0

  def test_hand_made_roc_and_tpr_at_fpr(self):
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    is_member = np.array([1, 0, 1, 1, 0])
    fpr, tpr, thresholds = membership.roc_curve(scores, is_member)
    np.testing.assert_allclose(fpr, [0, 0, .5, .5, .5, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 1 / 3, 2 / 3, 1, 1])
    np.testing.assert_array_equal(thresholds, [np.inf, 5, 4, 3, 2, 1])
    assert membership.tpr_at_fpr(scores, is_member, 0.0) == pytest.approx(1 / 3)
    assert membership.tpr_at_fpr(scores, is_member, 0.49) == pytest.approx(
        1 / 3)
    np.testing.assert_allclose(
        membership.tpr_at_fpr(scores, is_member, np.array([0.5, 1.0])), [1, 1])
    # Member/non-member pairs ordered right: 4 of 6.
    assert membership.auc(scores, is_member) == pytest.approx(4 / 6)
    assert membership.advantage(scores, is_member) == pytest.approx(0.5)

  def test_auc_equals_mann_whitney_with_ties(self):
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 8, size=300)
    is_member = rng.random(300) < 0.4
    u = scipy.stats.mannwhitneyu(scores[is_member],
                                 scores[~is_member]).statistic
    expected = u / (is_member.sum() * (~is_member).sum())
    assert membership.auc(scores, is_member) == pytest.approx(expected)

  def test_invalid_inputs_raise(self):
    with pytest.raises(ValueError, match='equal length'):
      membership.auc(np.zeros(3), np.ones(2, bool))
    with pytest.raises(ValueError, match='at least one member'):
      membership.auc(np.zeros(3), np.ones(3, bool))
    with pytest.raises(ValueError, match='finite'):
      membership.auc(np.array([0.0, np.nan]), np.array([True, False]))
    with pytest.raises(ValueError, match='target_fpr'):
      membership.tpr_at_fpr(np.zeros(2), np.array([True, False]), 1.5)


class TestEpsilon:

  def test_point_estimate_closed_form(self):
    assert membership.epsilon_from_rates(0.5, 0.05, 0.0) == pytest.approx(
        np.log(10))
    assert membership.epsilon_from_rates(0.5, 0.05, 0.1) == pytest.approx(
        np.log(8))
    # The complementary inequality: TNR 0.95 vs FNR 0.5 -> log(1.9) < log 10.
    assert membership.epsilon_from_rates(0.05, 0.05, 0.0) == 0.0
    assert membership.epsilon_from_rates(0.9, 0.5, 0.0) == pytest.approx(
        np.log(0.5 / 0.1))
    assert membership.epsilon_from_rates(0.5, 0.0, 0.0) == np.inf

  def test_clopper_pearson_matches_scipy(self):
    for successes, trials in [(0, 20), (7, 20), (20, 20), (130, 1000)]:
      # A one-sided bound at c is one end of the two-sided interval at 2c-1.
      interval = scipy.stats.binomtest(successes, trials).proportion_ci(
          confidence_level=0.9, method='exact')
      assert membership.clopper_pearson_lower(
          successes, trials, 0.95) == pytest.approx(interval.low, abs=1e-12)
      assert membership.clopper_pearson_upper(
          successes, trials, 0.95) == pytest.approx(interval.high, abs=1e-12)

  def test_lower_bound_closed_form_and_limits(self):
    # All members and no non-members flagged, n each: TPR_lo = a^(1/n),
    # FPR_hi = 1 - a^(1/n) with a = 0.025 (95% split over two rates).
    n, delta = 1000, 1e-5
    root = 0.025 ** (1 / n)
    expected = np.log(root - delta) - np.log(1 - root)
    assert membership.epsilon_lower_bound(n, n, 0, n, delta) == pytest.approx(
        expected)
    # Below the point estimate, approaching it as the counts grow.
    point = membership.epsilon_from_rates(0.3, 0.03, delta)
    bounds = [membership.epsilon_lower_bound(3 * k, 10 * k, 3 * k // 10,
                                             10 * k, delta)
              for k in (100, 1000, 100_000)]
    assert np.all(np.diff(bounds) > 0) and bounds[-1] < point
    assert bounds[-1] == pytest.approx(point, abs=0.05)
    # Chance-level test: no evidence.
    assert membership.epsilon_lower_bound(50, 100, 50, 100, delta) == 0.0

  def test_split_bound(self):
    scores, is_member = _gaussian_scores(4, 2_000, 0.0)
    assert membership.split_epsilon_lower_bound(scores, is_member, 1e-5) == 0.0
    separated = np.r_[np.ones(2000), np.zeros(2000)]
    assert membership.split_epsilon_lower_bound(
        separated, is_member, 1e-5) == pytest.approx(
            membership.epsilon_lower_bound(1000, 1000, 0, 1000, 1e-5))


class TestAttainableMaximum:

  def test_closed_form(self):
    # Evaluation halves of 2,500 members and 150 non-members; a perfect test
    # there: TPR_lo = (a/2)^(1/2500), FPR_hi = 1 - (a/2)^(1/150), a = 0.05.
    tpr_lo, fpr_hi = 0.025 ** (1 / 2500), 1 - 0.025 ** (1 / 150)
    want = max(np.log(tpr_lo - 1e-5) - np.log(fpr_hi),
               np.log(1 - fpr_hi - 1e-5) - np.log(1 - tpr_lo))
    got = membership.max_split_epsilon_lower_bound(5000, 300, 1e-5)
    assert got == pytest.approx(want, rel=1e-9)
    assert got == pytest.approx(6.49, abs=0.01)

  def test_perfect_attack_attains_it_and_nothing_exceeds_it(self):
    rng = np.random.default_rng(0)
    is_member = np.r_[np.ones(400, bool), np.zeros(61, bool)]
    attainable = membership.max_split_epsilon_lower_bound(400, 61, 1e-5)
    perfect = np.where(is_member, 1.0, 0.0)
    assert membership.split_epsilon_lower_bound(
        perfect, is_member, 1e-5) == pytest.approx(attainable)
    for seed in range(5):
      scores = rng.normal(size=461) + 3 * is_member
      assert membership.split_epsilon_lower_bound(
          scores, is_member, 1e-5, key=seed) <= attainable + 1e-12
    metrics = membership.attack_metrics(perfect, is_member, 1e-5)
    assert metrics['epsilon_lower_bound_max'] == pytest.approx(attainable)
    assert membership.max_split_epsilon_lower_bound(1, 61, 1e-5) == 0.0


class TestAttacks:

  def test_membership_inference_keys_and_counts(self):
    result = membership.membership_inference(
        np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.5, 0.6, 0.7, 0.8, 0.9]),
        np.array([0, 1, 0, 1]), np.array([0, 1, 0, 1, 0]), key=0)
    assert set(result) == {'loss_threshold', 'class_calibrated'}
    loss = result['loss_threshold']
    assert set(loss) == {'auc', 'tpr_at_fpr_0.001', 'tpr_at_fpr_0.01',
                         'advantage', 'epsilon_lower_bound',
                         'epsilon_lower_bound_max', 'num_members',
                         'num_nonmembers'}
    assert (loss['num_members'], loss['num_nonmembers']) == (4, 5)
    assert loss['auc'] == 1.0 and loss['tpr_at_fpr_0.001'] == 1.0
    # Calibration uses half of the non-members (2 of 5) as its reference.
    assert result['class_calibrated']['num_nonmembers'] == 3
    assert set(membership.membership_inference([0.1, 0.2], [0.3, 0.4])) == {
        'loss_threshold'}
    with pytest.raises(ValueError, match='both'):
      membership.membership_inference([0.1], [0.2], member_labels=[0])

  def _two_difficulty_classes(self, seed, num_each):
    """Class 0: easy (non-member loss N(1, 0.1)); class 1: hard (N(5, 1)).
    Members have loss one class-std lower than non-members of their class."""
    rng = np.random.default_rng(seed)
    labels = [rng.integers(0, 2, size=num_each) for _ in range(2)]
    means, stds = np.array([1.0, 5.0]), np.array([0.1, 1.0])
    noises = [rng.normal(size=num_each) for _ in range(2)]
    member_losses = means[labels[0]] - stds[labels[0]] + stds[labels[0]] * (
        noises[0])
    nonmember_losses = means[labels[1]] + stds[labels[1]] * noises[1]
    return member_losses, nonmember_losses, labels[0], labels[1]

  def test_calibration_beats_raw_loss_on_mixed_difficulty(self):
    members, nonmembers, member_labels, nonmember_labels = (
        self._two_difficulty_classes(5, 10_000))
    result = membership.membership_inference(
        members, nonmembers, member_labels, nonmember_labels, key=6)
    calibrated = result['class_calibrated']['auc']
    # Per class the scores are N(1, 1) vs N(0, 1): AUC Phi(1 / sqrt 2).
    assert calibrated == pytest.approx(_norm.cdf(1 / np.sqrt(2)), abs=0.015)
    assert calibrated > result['loss_threshold']['auc'] + 0.1

  def test_calibrated_scores_invariant_to_per_class_affine_loss(self):
    members, nonmembers, member_labels, nonmember_labels = (
        self._two_difficulty_classes(7, 200))
    def rescale_class_1(losses, labels):
      return np.where(labels == 1, 3.0 * losses + 7.0, losses)
    original = membership.class_calibrated_scores(
        members, nonmembers, member_labels, nonmember_labels, key=8)
    rescaled = membership.class_calibrated_scores(
        rescale_class_1(members, member_labels),
        rescale_class_1(nonmembers, nonmember_labels), member_labels,
        nonmember_labels, key=8)
    np.testing.assert_allclose(rescaled[0], original[0], rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(rescaled[1], original[1])

  def test_audit_membership_from_losses_is_flat(self):
    row = membership.audit_membership_from_losses(
        np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 1, 0, 1]),
        np.array([0.5, 0.6, 0.7, 0.8]), np.array([0, 1, 0, 1]), key=0,
        delta=1e-5)
    assert row['mia_loss_threshold_auc'] == 1.0
    assert 'mia_class_calibrated_advantage' in row
    assert all(isinstance(value, (int, float)) for value in row.values())
