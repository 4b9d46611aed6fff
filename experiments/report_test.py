"""Tests of experiments.report's figures (the grid end to end is in tests/test_grid.py)."""

import matplotlib.pyplot as plt
import pytest

from experiments import report


def _result(mech, beta, epochs):
  history = [{'val_accuracy': 0.5 + 0.1 * e, 'train_accuracy': 0.6 + 0.1 * e}
             for e in range(epochs)]
  return {'dataset': 'pneumonia', 'mech': mech, 'beta': beta, 'config': {},
          'release': {'history': history}, 'not_covered': {'history': history}}


@pytest.mark.parametrize('epochs', [2, 3, 7])
@pytest.mark.parametrize('train', [True, False])
def test_learning_curve_epoch_ticks_are_whole_numbers(epochs, train):
  """Two or three epochs used to get ticks 1.2, 1.4, ...: an epoch is a whole number."""
  results = [_result('none', None, epochs), _result('dpsgd', 1.0, epochs)]
  fig = report.learning_curves_figure(results, train=train)
  try:
    fig.canvas.draw()
    (ax,) = fig.axes
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert len(ticks) >= 2 and all(t == round(t) for t in ticks), ticks
    assert ax.get_xlabel() == 'epoch'
  finally:
    plt.close(fig)


def test_plot_learning_curves_writes_a_png(tmp_path):
  path = tmp_path / 'learning_curves.png'
  report.plot_learning_curves([_result('ldp', 2.0, 2)], path, train=False)
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def _row(dataset, variant, cell, epsilon, balanced, secondary, threshold=None):
  row = {'dataset': dataset, 'variant': variant, 'cell': cell, 'seeds': 3,
         'epsilon': epsilon * (1 - 3e-5) if epsilon else float('nan'),
         'target_epsilon': epsilon, 'balanced_mean': balanced, 'balanced_std': 0.01,
         'secondary_mean': secondary, 'secondary_std': 0.01,
         'secondary_metric': 'roc_auc' if dataset == 'pneumonia' else 'quadratic_weighted_kappa',
         'num_classes': 2 if dataset == 'pneumonia' else 5}
  if threshold is not None:
    row['threshold_balanced_mean'], row['threshold_balanced_std'] = threshold, 0.02
  return row


def _utility_rows():
  return [_row('pneumonia', 'resnet8 (modern)', 'original', None, 0.96, 0.99, 0.97),
          _row('pneumonia', 'resnet8 (modern)', 'dpsgd_b1', 1.0, 0.5, 0.66, 0.59),
          _row('pneumonia', 'resnet8 (modern)', 'dpsgd_b0.125', 8.0, 0.5, 0.94, 0.86),
          _row('pneumonia', 'scatternet (modern)', 'dpsgd_b1', 1.0, 0.77, 0.93, 0.83),
          _row('aptos', 'scatternet (modern)', 'dpsgd_b1', 1.0, 0.39, 0.80),
          _row('aptos', 'scatternet (modern)', 'dpsgd_b0.125', 8.0, 0.40, 0.81)]


def test_privacy_utility_figure_colours_chance_thresholds_and_ticks():
  """One colour per variant in every panel (its non-private line too); a constant prediction
  at 1/classes balanced accuracy (20% for five DR grades, not 50%); the thresholded balanced
  accuracy of binary tasks drawn beside the argmax's; ticks at the target epsilons."""
  fig = report.privacy_utility_figure(_utility_rows())
  try:
    fig.canvas.draw()
    (aptos_balanced, aptos_kappa), (pneu_balanced, pneu_auc) = (fig.axes[:2], fig.axes[2:])
    def lines(ax):  # Legend label -> its line (an error bar's data line).
      handles, labels = ax.get_legend_handles_labels()
      return {label: getattr(handle, 'lines', [handle])[0]
              for handle, label in zip(handles, labels)}
    def colour(ax, label):
      return lines(ax)[label].get_color()
    scatternet = 'scatternet (modern), DP-SGD'
    assert colour(aptos_balanced, scatternet) == colour(pneu_balanced, scatternet)
    assert colour(pneu_balanced, 'resnet8 (modern), non-private') == colour(
        pneu_balanced, 'resnet8 (modern), DP-SGD') != colour(pneu_balanced, scatternet)
    assert lines(aptos_balanced)['a constant prediction'].get_ydata()[0] == pytest.approx(20)
    assert lines(pneu_balanced)['a constant prediction'].get_ydata()[0] == pytest.approx(50)
    assert lines(aptos_kappa)['a constant prediction'].get_ydata()[0] == 0
    assert lines(pneu_auc)['a constant prediction'].get_ydata()[0] == 0.5
    threshold = lines(pneu_balanced)['resnet8 (modern), DP-SGD at val threshold']
    assert list(threshold.get_ydata()) == pytest.approx([59, 86])
    assert not any('threshold' in label for label in lines(aptos_balanced))
    assert not any('threshold' in label for label in lines(pneu_auc))
    assert [t.get_text() for t in pneu_balanced.get_xticklabels()] == ['1', '8']
  finally:
    plt.close(fig)


def test_tables_show_the_thresholded_balanced_accuracy_for_two_classes_only():
  rows = _utility_rows()
  for row in rows:
    row.update(protocol='sound', data='demo', majority_baseline=0.625, guarantee='g',
               privacy_unit='patient', published_test=None, val_mean=0.8, val_std=0.01,
               test_mean=0.8, test_std=0.01)
  text = report.markdown_table(rows, publishable=True)
  aptos, pneumonia = text.split('### aptos')[1].split('### pneumonia')
  assert 'at val threshold' not in aptos and '| test balanced acc % | test QW kappa |' in aptos
  assert '| test balanced acc % | test balanced acc % at val threshold | test ROC AUC |' in pneumonia
  assert '| 50.00 ± 1.00 | 59.00 ± 2.00 | 0.660 ± 0.010 |' in pneumonia


def test_csv_header_is_first_seen_order_whatever_the_rows(tmp_path):
  """A key missing from the first row (APTOS has no threshold) used to land in set order,
  which changes with PYTHONHASHSEED."""
  rows = [{'dataset': 'aptos', 'cell': 'original', 'balanced_mean': 0.4},
          {'dataset': 'pneumonia', 'cell': 'original', 'balanced_mean': 0.9,
           'threshold_balanced_mean': 0.92, 'threshold_balanced_std': 0.01, 'num_classes': 2}]
  path = tmp_path / 'table.csv'
  report.write_csv(rows, path)
  assert path.read_text().splitlines()[0] == (
      'dataset,cell,balanced_mean,threshold_balanced_mean,threshold_balanced_std,num_classes')
