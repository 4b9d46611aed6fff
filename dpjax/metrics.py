"""Classification metrics beyond accuracy, from predicted class probabilities.

Imbalanced medical test sets make accuracy misleading (62.5% of the pneumonia test set is
one class), so results also carry balanced accuracy, per-class recall, the confusion
matrix, ROC AUC for binary tasks and quadratic weighted kappa for ordinal DR grades.

Why not scikit-learn's `roc_auc_score`, `balanced_accuracy_score` and `cohen_kappa_score`:
`import dpjax` needs only jax, flax, optax, dp-accounting and numpy, and these are a few lines
of numpy each. They are tested against scikit-learn's (metrics_test.py), which stays a test
dependency.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """Counts with true classes as rows and predicted classes as columns."""
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
  return matrix


def per_class_recall(matrix: np.ndarray) -> np.ndarray:
  """Recall of each class; NaN for a class absent from the labels."""
  support = matrix.sum(axis=1)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.diag(matrix) / support


def balanced_accuracy(matrix: np.ndarray) -> float:
  """Mean recall over the classes present in the labels."""
  return float(np.nanmean(per_class_recall(matrix)))


def roc_auc(scores, labels) -> float:
  """Area under the ROC curve of "a higher score means the positive class", ties counted half.

  The one ROC AUC of dpjax (the membership audit uses it too): exact, the Mann-Whitney U
  statistic over n_pos * n_neg, i.e. P(score of a random positive > score of a random
  negative) + P(equal) / 2, from average ranks.

  Args:
    scores: float ``[n]``; higher means "more likely positive" (e.g. the predicted
      probability of class 1, or minus a loss).
    labels: ``[n]`` bool or 0/1; True / 1 marks the positive class.

  Returns:
    The AUC in [0, 1]; NaN when one class is absent or a score is NaN.

  Raises:
    ValueError: lengths differ, or `labels` holds values other than 0/1 (e.g. scores passed
      as labels: the arguments are ``(scores, labels)``).
  """
  scores = np.asarray(scores, np.float64).reshape(-1)
  labels = np.asarray(labels).reshape(-1)
  if scores.shape != labels.shape:
    raise ValueError(f'roc_auc: expected scores and labels of equal length, got '
                     f'{scores.shape} and {labels.shape}')
  if labels.dtype != bool:
    other = labels[(labels != 0) & (labels != 1)]
    if other.size:
      raise ValueError(f'roc_auc: expected labels of 0/1 or bool, got {other[0].item()!r} (the '
                       'arguments are (scores, labels))')
    labels = labels == 1
  n_pos, n_neg = int(labels.sum()), int((~labels).sum())
  if n_pos == 0 or n_neg == 0 or np.isnan(scores).any():
    return float('nan')
  order = np.argsort(scores, kind='mergesort')
  sorted_scores = scores[order]
  ranks = np.empty(len(scores), np.float64)
  # Average ranks (1-based) over ties.
  _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
  average = first + (counts - 1) / 2.0 + 1.0
  ranks[order] = np.repeat(average, counts)
  u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def quadratic_weighted_kappa(matrix: np.ndarray) -> float:
  """Cohen's kappa with quadratic disagreement weights (APTOS 2019's metric)."""
  matrix = np.asarray(matrix, np.float64)
  k = matrix.shape[0]
  total = matrix.sum()
  if total == 0:
    return float('nan')
  i, j = np.meshgrid(np.arange(k), np.arange(k), indexing='ij')
  weights = (i - j) ** 2 / max((k - 1) ** 2, 1)
  expected = np.outer(matrix.sum(axis=1), matrix.sum(axis=0)) / total
  denominator = (weights * expected).sum()
  if denominator == 0:
    return float('nan')
  return float(1.0 - (weights * matrix).sum() / denominator)


def classification_report(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
  """All metrics of one split; probs has shape [n, num_classes]."""
  probs = np.asarray(probs)
  labels = np.asarray(labels)
  num_classes = probs.shape[1]
  matrix = confusion_matrix(labels, probs.argmax(axis=1), num_classes)
  report: dict[str, Any] = {
      'accuracy': float(np.trace(matrix) / max(matrix.sum(), 1)),
      'balanced_accuracy': balanced_accuracy(matrix),
      'per_class_recall': [float(r) for r in per_class_recall(matrix)],
      'confusion_matrix': matrix.tolist(),
  }
  if num_classes == 2:
    report['roc_auc'] = roc_auc(probs[:, 1], labels == 1)
  else:
    report['quadratic_weighted_kappa'] = quadratic_weighted_kappa(matrix)
  return report


def balanced_threshold(scores, labels) -> float:
  """The decision threshold on a positive-class score that maximises balanced accuracy.

  Youden's J: sensitivity + specificity - 1 over every cut between two distinct scores (and
  below and above all of them); ties between cuts go to the one nearest 0.5, the argmax rule's
  threshold for two-class probabilities. Choose it on VALIDATION data: chosen on the split
  it is reported on, it flatters the reported numbers.

  Args:
    scores: ``[n]`` score of the positive class (e.g. the predicted probability of class 1).
    labels: ``[n]`` 0/1 or bool.

  Returns:
    A threshold t; predict positive when ``score >= t``. 0.5 when a class is absent or a score
    is not finite (no cut can be judged).
  """
  scores = np.asarray(scores, np.float64).reshape(-1)
  positive = np.asarray(labels).reshape(-1).astype(bool)
  if positive.all() or not positive.any() or not np.isfinite(scores).all():
    return 0.5
  unique = np.unique(scores)
  cuts = np.concatenate([[unique[0] - 1.0], (unique[:-1] + unique[1:]) / 2, [unique[-1] + 1.0]])
  predicted = scores[None, :] >= cuts[:, None]
  sensitivity = (predicted & positive).sum(1) / positive.sum()
  specificity = (~predicted & ~positive).sum(1) / (~positive).sum()
  youden = sensitivity + specificity
  best = np.flatnonzero(youden >= youden.max() - 1e-12)
  return float(cuts[best[np.argmin(np.abs(cuts[best] - 0.5))]])


def report_at_threshold(scores, labels, threshold: float) -> dict[str, float]:
  """Accuracy, balanced accuracy, sensitivity and specificity of ``score >= threshold``."""
  scores = np.asarray(scores, np.float64).reshape(-1)
  positive = np.asarray(labels).reshape(-1).astype(bool)
  predicted = scores >= threshold
  matrix = confusion_matrix(positive.astype(int), predicted.astype(int), 2)
  recall = per_class_recall(matrix)
  return {'threshold': float(threshold),
          'accuracy': float(np.trace(matrix) / max(matrix.sum(), 1)),
          'balanced_accuracy': balanced_accuracy(matrix),
          'sensitivity': float(recall[1]), 'specificity': float(recall[0]),
          'confusion_matrix': matrix.tolist()}
