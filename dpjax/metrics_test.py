import numpy as np
import pytest

from dpjax import metrics
from dpjax.audit import membership


def test_confusion_matrix_and_balanced_accuracy_closed_form():
  labels = np.array([0, 0, 0, 1, 1, 2])
  predictions = np.array([0, 1, 0, 1, 1, 0])
  matrix = metrics.confusion_matrix(labels, predictions, 3)
  np.testing.assert_array_equal(matrix, [[2, 1, 0], [0, 2, 0], [1, 0, 0]])
  np.testing.assert_allclose(metrics.per_class_recall(matrix), [2 / 3, 1.0, 0.0])
  assert metrics.balanced_accuracy(matrix) == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_majority_classifier_has_balanced_accuracy_one_over_k():
  labels = np.array([1] * 390 + [0] * 234)
  matrix = metrics.confusion_matrix(labels, np.ones_like(labels), 2)
  assert np.trace(matrix) / matrix.sum() == pytest.approx(0.625)
  assert metrics.balanced_accuracy(matrix) == pytest.approx(0.5)


def test_roc_auc_matches_pairwise_definition_with_ties():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 200).astype(bool)
  scores = np.round(rng.normal(size=200) + labels, 1)  # Rounding makes ties.
  pos, neg = scores[labels], scores[~labels]
  pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
      len(pos) * len(neg))
  assert metrics.roc_auc(scores, labels) == pytest.approx(pairwise)
  assert metrics.roc_auc(labels.astype(float), labels) == 1.0
  assert metrics.roc_auc(np.zeros(200), labels) == 0.5


def test_roc_auc_argument_order_closed_form_with_ties():
  # Positives score 0.9, 0.8, 0.1; negatives 0.8, 0.3. Of the 6 (positive, negative) pairs,
  # 3 are ordered right, 1 is tied (0.8 = 0.8, counted half) and 2 wrong: AUC = 3.5 / 6.
  scores = np.array([0.9, 0.8, 0.8, 0.3, 0.1])
  labels = np.array([1, 1, 0, 0, 1])
  assert metrics.roc_auc(scores, labels) == pytest.approx(7 / 12)
  assert metrics.roc_auc(labels=labels.astype(bool), scores=scores) == pytest.approx(7 / 12)
  assert metrics.roc_auc(scores, 1 - labels) == pytest.approx(5 / 12)  # The other class.
  assert metrics.roc_auc(-scores, labels) == pytest.approx(5 / 12)
  with pytest.raises(ValueError, match='0/1'):
    metrics.roc_auc(labels, scores)  # Swapped: the scores are not 0/1 labels.
  assert np.isnan(metrics.roc_auc(scores, np.ones(5, bool)))  # One class only.
  # The membership audit uses the same function ("member" is the positive class).
  assert membership.auc(scores, labels) == pytest.approx(7 / 12)


def test_quadratic_weighted_kappa_known_values():
  perfect = np.diag([5, 3, 4, 1, 2])
  assert metrics.quadratic_weighted_kappa(perfect) == pytest.approx(1.0)
  # Worked by hand: one disagreement of weight 1/4; expected counts from the marginals
  # [2,1,1] x [1,2,1] / 4 carry total weight 5/4, so kappa = 1 - 0.25 / 1.25 = 0.8.
  matrix = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]])
  w = np.array([[0, .25, 1], [.25, 0, .25], [1, .25, 0]])
  expected = np.outer(matrix.sum(1), matrix.sum(0)) / matrix.sum()
  assert metrics.quadratic_weighted_kappa(matrix) == pytest.approx(
      1 - (w * matrix).sum() / (w * expected).sum())
  assert metrics.quadratic_weighted_kappa(matrix) == pytest.approx(0.8)


def test_classification_report_binary_and_multiclass():
  probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
  report = metrics.classification_report(probs, np.array([0, 1, 1, 1]))
  assert report['accuracy'] == 0.75
  assert report['roc_auc'] == 1.0
  assert report['confusion_matrix'] == [[1, 0], [1, 2]]
  probs5 = np.eye(5)[[0, 1, 2, 3, 4, 0]]
  report5 = metrics.classification_report(probs5, np.array([0, 1, 2, 3, 4, 0]))
  assert report5['quadratic_weighted_kappa'] == pytest.approx(1.0)
  assert 'roc_auc' not in report5


def test_balanced_threshold_maximises_balanced_accuracy_and_prefers_half():
  # Positives score 0.1-0.3, negatives 0.0-0.05: argmax at 0.5 calls everything negative.
  scores = np.array([0.0, 0.02, 0.05, 0.1, 0.2, 0.3])
  labels = np.array([0, 0, 0, 1, 1, 1])
  t = metrics.balanced_threshold(scores, labels)
  assert 0.05 < t <= 0.1
  report = metrics.report_at_threshold(scores, labels, t)
  assert report['balanced_accuracy'] == report['sensitivity'] == report['specificity'] == 1.0
  assert metrics.report_at_threshold(scores, labels, 0.5)['balanced_accuracy'] == 0.5
  # Perfectly separated around 0.5 in both ways: the cut nearest 0.5 wins.
  assert metrics.balanced_threshold([0.1, 0.9], [0, 1]) == 0.5
  assert metrics.balanced_threshold([0.2, 0.3], [1, 1]) == 0.5  # One class: no cut to judge.
  assert metrics.balanced_threshold([np.nan, 0.3], [0, 1]) == 0.5


def test_metrics_equal_scikit_learn_on_random_predictions():
  sklearn_metrics = pytest.importorskip('sklearn.metrics')
  rng = np.random.default_rng(0)
  for num_classes in (2, 5):
    labels = rng.integers(0, num_classes, 500)
    predictions = np.where(rng.random(500) < 0.6, labels, rng.integers(0, num_classes, 500))
    matrix = metrics.confusion_matrix(labels, predictions, num_classes)
    np.testing.assert_array_equal(
        matrix, sklearn_metrics.confusion_matrix(labels, predictions, labels=range(num_classes)))
    assert metrics.balanced_accuracy(matrix) == pytest.approx(
        sklearn_metrics.balanced_accuracy_score(labels, predictions), abs=1e-12)
    assert metrics.quadratic_weighted_kappa(matrix) == pytest.approx(
        sklearn_metrics.cohen_kappa_score(labels, predictions, weights='quadratic'), abs=1e-12)
  scores = np.round(rng.random(500), 2)  # Ties on purpose.
  labels = rng.random(500) < scores
  assert metrics.roc_auc(scores, labels) == pytest.approx(
      sklearn_metrics.roc_auc_score(labels, scores), abs=1e-12)
