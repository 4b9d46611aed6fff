"""Which epoch's model a run releases: selection on a validation metric, never on test.

The paper kept the model of lowest validation loss. Under DP-SGD the loss of an early model
near the class prior is often the lowest while later models rank patients far better: on the
demo, lowest validation loss released the epoch-1 model for three of six settings whose
validation ROC AUC rose to 0.90-0.97 later. The sound protocol therefore selects on the metric
the benchmark reports (ROC AUC for two classes, quadratic weighted kappa for DR grades); the
paper protocol keeps the validation loss.

>>> resolve('auto', protocol='sound', num_classes=2)
'val_auc'
>>> score({'loss': 0.7, 'roc_auc': float('nan')}, 'val_auc')
-inf
"""

from __future__ import annotations

import math

from experiments.config_checks import SELECTIONS
from experiments.config_checks import ConfigError
from experiments.config_checks import check_selection_fits

# The validation-metric name each selection maximises (the loss is minimised).
_METRIC = {'val_loss': 'loss', 'val_auc': 'roc_auc', 'val_balanced_accuracy': 'balanced_accuracy',
           'val_kappa': 'quadratic_weighted_kappa'}
DESCRIPTIONS = {
    'val_loss': 'lowest validation loss',
    'val_auc': 'highest validation ROC AUC',
    'val_balanced_accuracy': 'highest validation balanced accuracy',
    'val_kappa': 'highest validation quadratic weighted kappa',
    'last': 'the last epoch',
}


def resolve(selection: str, *, protocol: str, num_classes: int) -> str:
  """The selection a run uses: `auto` is val_loss under the paper protocol, else the task's
  threshold-free metric (val_auc for two classes, val_kappa for more)."""
  if selection not in SELECTIONS:
    raise ConfigError(f'--selection must be one of {"|".join(SELECTIONS)}, got {selection!r}')
  if selection == 'auto':
    if protocol == 'paper':
      return 'val_loss'
    return 'val_auc' if num_classes == 2 else 'val_kappa'
  check_selection_fits(selection, num_classes)
  return selection


def score(val: dict[str, float], selection: str) -> float:
  """Higher is better; a metric that is not finite (one class in validation) never wins."""
  if selection == 'last':
    return math.inf
  value = float(val.get(_METRIC[selection], math.nan))
  if not math.isfinite(value):
    return -math.inf
  return -value if selection == 'val_loss' else value


def is_better(new_score: float, best_score: float, best_epoch: int, selection: str) -> bool:
  """Strictly better (ties keep the earlier model), the first epoch always, `last` always."""
  return selection == 'last' or best_epoch < 0 or new_score > best_score
