"""Classification metrics beyond accuracy, from predicted class probabilities.

Imbalanced medical test sets make accuracy misleading (62.5% of the pneumonia test set is
one class), so results also carry balanced accuracy, per-class recall, the confusion
matrix, ROC AUC for binary tasks and quadratic weighted kappa for ordinal DR grades.
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


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Area under the ROC curve of binary labels (1 = positive), ties counted half.

  Equals the probability that a random positive scores above a random negative
  (the Mann-Whitney U statistic divided by n_pos * n_neg).
  """
  labels = np.asarray(labels).astype(bool)
  scores = np.asarray(scores, np.float64)
  n_pos, n_neg = int(labels.sum()), int((~labels).sum())
  if n_pos == 0 or n_neg == 0:
    return float('nan')
  order = np.argsort(scores, kind='mergesort')
  sorted_scores = scores[order]
  ranks = np.empty(len(scores), np.float64)
  # Average ranks over ties.
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
    report['roc_auc'] = roc_auc(labels == 1, probs[:, 1])
  else:
    report['quadratic_weighted_kappa'] = quadratic_weighted_kappa(matrix)
  return report
