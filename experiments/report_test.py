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
