"""Model selection and the operating point read validation data only."""

import copy
import math

import numpy as np
import pytest

from experiments import selection
from experiments import train
from experiments.config_checks import ConfigError


def test_auto_is_the_task_metric_except_under_the_paper_protocol():
  assert selection.resolve('auto', protocol='sound', num_classes=2) == 'val_balanced_accuracy'
  assert selection.resolve('auto', protocol='sound', num_classes=5) == 'val_kappa'
  assert selection.resolve('auto', protocol='paper', num_classes=2) == 'val_loss'
  with pytest.raises(ConfigError, match='val_auc'):
    selection.resolve('val_auc', protocol='sound', num_classes=5)
  with pytest.raises(ConfigError, match='--selection'):
    selection.resolve('test_auc', protocol='sound', num_classes=2)


def _progress(rule):
  return train._Progress(best_params='init', selection=rule)


# Validation of a private model: its loss is lowest at epoch 1 (near the class prior), its
# ranking best at epoch 3.
_EPOCHS = [{'loss': 0.60, 'accuracy': 0.7, 'balanced_accuracy': 0.5, 'roc_auc': 0.70},
           {'loss': 0.80, 'accuracy': 0.7, 'balanced_accuracy': 0.6, 'roc_auc': 0.90},
           {'loss': 0.90, 'accuracy': 0.8, 'balanced_accuracy': 0.8, 'roc_auc': 0.95},
           {'loss': 0.95, 'accuracy': 0.8, 'balanced_accuracy': 0.7, 'roc_auc': float('nan')}]


@pytest.mark.parametrize('rule, epoch', [('val_loss', 1), ('val_auc', 3),
                                         ('val_balanced_accuracy', 3), ('last', 4)])
def test_each_rule_releases_its_epoch_and_nan_never_wins(rule, epoch):
  progress = _progress(rule)
  for i, val in enumerate(_EPOCHS, start=1):
    progress.end_epoch(i, 10 * i, val, private=False, get_params=lambda i=i: f'epoch {i}',
                       learning_rate=0.1)
  assert progress.best_epoch == epoch and progress.best_params == f'epoch {epoch}'
  restored = train._Progress.from_meta(progress.to_meta(), progress.best_params)
  assert (restored.selection, restored.best_epoch) == (rule, epoch)


def test_balanced_accuracy_ties_go_to_the_better_ranking_then_the_earlier_epoch():
  # A private model at the class prior scores 0.5 in several epochs: the release is the one
  # that ranks best among them, not the first.
  epochs = [{'loss': 0.6, 'balanced_accuracy': 0.5, 'roc_auc': 0.60},
            {'loss': 0.9, 'balanced_accuracy': 0.5, 'roc_auc': 0.95},
            {'loss': 0.7, 'balanced_accuracy': 0.5, 'roc_auc': 0.95},
            {'loss': 0.8, 'balanced_accuracy': 0.5, 'roc_auc': float('nan')}]
  progress = _progress('val_balanced_accuracy')
  for i, val in enumerate(epochs, start=1):
    progress.end_epoch(i, i, val, False, lambda i=i: f'epoch {i}', 0.1)
  assert progress.best_epoch == 2
  assert selection.score(epochs[1], 'val_balanced_accuracy') == (0.5, 0.95)
  # One class in validation: balanced accuracy is finite but meaningless, and never wins.
  assert selection.score(epochs[3], 'val_balanced_accuracy') == (-math.inf, -math.inf)


def test_balanced_accuracies_equal_but_for_rounding_tie():
  # Means of different recalls: 0.30000000000000004 and 0.3 are the same balanced accuracy.
  first = {'balanced_accuracy': (0.1 + 0.5) / 2, 'roc_auc': 0.9}
  second = {'balanced_accuracy': (0.2 + 0.4) / 2, 'roc_auc': 0.7}
  assert first['balanced_accuracy'] != second['balanced_accuracy']
  assert (selection.score(first, 'val_balanced_accuracy')
          > selection.score(second, 'val_balanced_accuracy'))
  progress = _progress('val_balanced_accuracy')
  for i, val in enumerate([second, first, second], start=1):
    progress.end_epoch(i, i, val, False, lambda i=i: f'epoch {i}', 0.1)
  assert progress.best_epoch == 2


def _history(epochs):
  return [{'epoch': i, **{f'val_{k}': v for k, v in val.items()}}
          for i, val in enumerate(epochs, start=1)]


def test_a_resumed_run_scores_its_best_as_this_version_does_not_as_saved():
  # Saved by an older version: unrounded, without the tie-break, or as one float. The score
  # resumed from is recomputed from the history, so a later tie is decided by today's rule.
  first = {'balanced_accuracy': (0.1 + 0.5) / 2, 'roc_auc': 0.7}
  progress = _progress('val_balanced_accuracy')
  progress.end_epoch(1, 1, first, False, lambda: 'epoch 1', 0.1)
  for saved in ([0.30000000000000004, 0.7], [0.3, -math.inf], 0.30000000000000004):
    meta = {**copy.deepcopy(progress.to_meta()), 'best_score': saved}
    restored = train._Progress.from_meta(meta, 'epoch 1')
    assert (restored.best_epoch, restored.best_score) == (1, (0.3, 0.7))
    restored.end_epoch(2, 2, {'balanced_accuracy': (0.2 + 0.4) / 2, 'roc_auc': 0.9}, False,
                       lambda: 'epoch 2', 0.1)
    assert restored.best_epoch == 2 and restored.best_params == 'epoch 2'


def test_a_checkpoint_that_kept_another_epoch_than_this_version_selects_is_refused():
  epochs = [{'balanced_accuracy': 0.6, 'roc_auc': 0.7}, {'balanced_accuracy': 0.6, 'roc_auc': 0.9}]
  meta = {**_progress('val_balanced_accuracy').to_meta(), 'epochs': _history(epochs),
          'best_epoch': 1, 'best_score': [0.6, -math.inf]}  # An older tie-break kept epoch 1.
  assert selection.replay(meta['epochs'], 'val_balanced_accuracy') == (2, (0.6, 0.9))
  with pytest.raises(selection.SelectionRuleChanged,
                     match=r'^w: its run kept the model of epoch 1, where val_balanced_accuracy '
                     r'as this version computes it selects epoch 2; use a new --workdir$'):
    selection.check_same_choice(meta['epochs'], 'val_balanced_accuracy', 1, 'w: its run')
  with pytest.raises(ConfigError, match='epoch 2'):
    train._Progress.from_meta(meta, 'epoch 1')
  selection.check_same_choice(meta['epochs'], 'val_balanced_accuracy', 2, 'w: its run')


def test_balanced_accuracy_over_dr_grades_ties_by_kappa():
  # Five grades have no ROC AUC: the tie-break is QW kappa, and a missing ROC AUC must not make
  # every epoch unrankable (which released epoch 1 whatever came later).
  epochs = [{'balanced_accuracy': 0.2, 'quadratic_weighted_kappa': 0.0},
            {'balanced_accuracy': 0.4, 'quadratic_weighted_kappa': 0.5},
            {'balanced_accuracy': 0.4, 'quadratic_weighted_kappa': 0.7},
            {'balanced_accuracy': 0.3, 'quadratic_weighted_kappa': 0.9}]
  progress = _progress('val_balanced_accuracy')
  for i, val in enumerate(epochs, start=1):
    progress.end_epoch(i, i, val, False, lambda i=i: f'epoch {i}', 0.1)
  assert progress.best_epoch == 3 and progress.best_score == (0.4, 0.7)
  assert selection.replay(_history(epochs), 'val_balanced_accuracy') == (3, (0.4, 0.7))
  assert 'QW kappa for DR grades' in selection.DESCRIPTIONS['val_balanced_accuracy']


def test_a_run_made_under_another_rule_is_neither_reused_nor_resumed():
  selection.check_same_rule('val_kappa', 'val_kappa', 'it')
  with pytest.raises(ConfigError, match=r'^--workdir=w: its finished run selected its model by '
                     r'val_auc .*, this run by val_balanced_accuracy; use a new --workdir$'):
    selection.check_same_rule('val_auc', 'val_balanced_accuracy',
                              '--workdir=w: its finished run')


def test_all_nan_scores_release_the_first_epoch_not_the_initial_model():
  progress = _progress('val_auc')
  for i in (1, 2):
    progress.end_epoch(i, i, {'loss': 1.0, 'accuracy': 0.5, 'roc_auc': math.nan}, False,
                       lambda i=i: f'epoch {i}', 0.1)
  assert progress.best_params == 'epoch 1'


def test_operating_point_is_chosen_on_validation_and_never_reads_test():
  rng = np.random.default_rng(0)
  val = {'probs': np.stack([1 - (p := rng.uniform(0, 0.3, 50)), p], 1),
         'labels': (p > 0.15).astype(int)}
  tests = [{'probs': np.stack([1 - (t := rng.uniform(0, 1, 40)), t], 1),
            'labels': rng.integers(0, 2, 40)} for _ in range(2)]
  points = [train.operating_point(val, test) for test in tests]
  assert points[0]['threshold'] == points[1]['threshold']
  assert 0.14 < points[0]['threshold'] < 0.16
  assert points[0]['val']['balanced_accuracy'] == 1.0
  assert points[0]['test'] != points[1]['test']  # Reported on test, chosen without it.
