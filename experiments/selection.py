"""Which epoch's model a run releases: selection on a validation metric, never on test.

The paper kept the model of lowest validation loss. Under DP-SGD the loss of an early model
near the class prior is often the lowest while later models rank patients far better: on the
demo, lowest validation loss released the epoch-1 model for three of six settings whose
validation ROC AUC rose to 0.90-0.97 later. Ranking alone is not enough either: a noisy
private model swings between classes from epoch to epoch, and the epoch of highest validation
ROC AUC was often one whose argmax predicted one class (the demo's grid at commit ea24b19:
ScatterNet CNN at epsilon 4, AUC 0.98 but balanced accuracy 0.58 on validation, where the
epoch of highest balanced accuracy had 0.92 at AUC 0.975). The sound protocol therefore
selects on the metric the benchmark reports first: balanced accuracy for two classes (ties,
frequent on a small validation split, broken by ROC AUC), quadratic weighted kappa for DR
grades. The paper protocol keeps the validation loss.

>>> resolve('auto', protocol='sound', num_classes=2)
'val_balanced_accuracy'
>>> score({'loss': 0.7, 'roc_auc': float('nan')}, 'val_auc')
(-inf,)
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
    'val_balanced_accuracy': ('highest validation balanced accuracy (ties: highest validation ROC '
                              'AUC, QW kappa for DR grades)'),
    'val_kappa': 'highest validation quadratic weighted kappa',
    'last': 'the last epoch',
}


def resolve(selection: str, *, protocol: str, num_classes: int) -> str:
  """The selection a run uses: `auto` is val_loss under the paper protocol, else the task's
  headline metric (val_balanced_accuracy for two classes, val_kappa for more)."""
  if selection not in SELECTIONS:
    raise ConfigError(f'--selection must be one of {"|".join(SELECTIONS)}, got {selection!r}')
  if selection == 'auto':
    if protocol == 'paper':
      return 'val_loss'
    return 'val_balanced_accuracy' if num_classes == 2 else 'val_kappa'
  check_selection_fits(selection, num_classes)
  return selection


# Compared after the rule's own metric, when that ties: the task's ranking metric, ROC AUC for
# two classes and QW kappa for DR grades (which have no ROC AUC); the first the task reports.
_TIE_BREAKS = {'val_balanced_accuracy': ('roc_auc', 'quadratic_weighted_kappa')}


# Metrics are rounded to this many digits before they are compared: equal balanced accuracies
# computed as means of different recalls differ in the last bit (0.3 vs 0.30000000000000004),
# and the tie-break, not rounding, must decide between them.
_DIGITS = 12


def _value(val: dict[str, float], metric: str, selection: str) -> float:
  value = float(val.get(metric, math.nan))
  if not math.isfinite(value):
    return -math.inf
  return round(-value if selection == 'val_loss' else value, _DIGITS)


def score(val: dict[str, float], selection: str) -> tuple[float, ...]:
  """Higher is better, compared as tuples: the rule's metric, then its tie-break if it has
  one. A score that is not finite never beats a finite one (the first epoch is kept until
  one does): ROC AUC with one class in validation, and balanced accuracy then too (finite
  over the one class present, but meaningless)."""
  if selection == 'last':
    return (math.inf,)
  primary = _value(val, _METRIC[selection], selection)
  if selection not in _TIE_BREAKS:
    return (primary,)
  reported = [metric for metric in _TIE_BREAKS[selection] if metric in val]
  tie = _value(val, reported[0], selection) if reported else -math.inf
  if primary == -math.inf or (reported and tie == -math.inf):
    return (-math.inf, -math.inf)
  return (primary, tie)


def validation_metrics(record: dict) -> dict[str, float]:
  """The validation metrics of one epoch's history record (its `val_*` entries)."""
  return {name[len('val_'):]: value for name, value in record.items() if name.startswith('val_')}


def replay(history: list[dict], selection: str) -> tuple[int, tuple[float, ...]]:
  """(epoch, score) the rule selects from a run's per-epoch history, as this version computes
  it: a resumed run continues from it, and a finished or checkpointed one is only taken up
  when it kept that epoch's model."""
  best_epoch, best_score = -1, (-math.inf,)
  for record in history:
    new_score = score(validation_metrics(record), selection)
    if is_better(new_score, best_score, best_epoch, selection):
      best_epoch, best_score = record['epoch'], new_score
  return best_epoch, best_score


def is_better(new_score: tuple[float, ...], best_score: tuple[float, ...], best_epoch: int,
              selection: str) -> bool:
  """Strictly better (ties keep the earlier model), the first epoch always, `last` always."""
  return selection == 'last' or best_epoch < 0 or tuple(new_score) > tuple(best_score)


class SelectionRuleChanged(ConfigError):
  """A run folder holds a run whose released model is not the one this run's rule selects;
  `why_for` says how, so a caller that owns the folder (experiments.grid, experiments.tune)
  can name its own flag and itself."""

  def __init__(self, why: str, what: str, recorded: str | None = None,
               current: str | None = None):
    self.why, self.recorded, self.current = why, recorded, current
    super().__init__(f'{what} {self.why_for("this run")}; use a new --workdir')

  def why_for(self, this: str) -> str:
    if self.current is None:
      return self.why
    return (f'selected its model by {self.recorded} (what its --selection meant then), {this} '
            f'by {self.current}')


def check_same_rule(recorded: str, current: str, what: str) -> None:
  """Refuses (one line) to reuse or resume a run that selected by another rule than this run
  resolves (e.g. made when `auto` meant another metric): its release is not what this
  configuration means."""
  if recorded != current:
    raise SelectionRuleChanged('', what, recorded, current)


def check_same_choice(history: list[dict], selection: str, kept_epoch: int, what: str) -> None:
  """Refuses (one line) to reuse or resume a run that kept another epoch's model than `selection`
  picks from its history as this version computes it (the rule's name is the same, but how it
  scores changed, e.g. its tie-break): its release is not what this version would make."""
  replayed, _ = replay(history, selection)
  if kept_epoch is None:
    raise SelectionRuleChanged('records no selected epoch', what)
  if replayed != kept_epoch:
    raise SelectionRuleChanged(
        f'kept the model of epoch {kept_epoch}, where {selection} as this version computes it '
        f'selects epoch {replayed}', what)
