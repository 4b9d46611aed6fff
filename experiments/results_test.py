"""The console summary: the scores that matter beside accuracy, and the model that learns."""

from experiments import results


def _results(arch, pretrained=False, data='demo'):
  report = {'accuracy': 0.625, 'balanced_accuracy': 0.5, 'roc_auc': 0.6}
  point = {'accuracy': 0.7, 'balanced_accuracy': 0.72, 'sensitivity': 0.8, 'specificity': 0.64}
  return {'dataset': 'pneumonia', 'mech': 'dpsgd', 'beta': 1.0, 'data': data,
          'pretrained': pretrained, 'guarantee': '(1, 1e-05)-DP', 'privacy_unit': 'patient',
          'workdir': '/tmp/w', 'config': {'arch': arch, 'epsilon': 0.0},
          'release': {'test_metrics': report, 'majority_baseline': 0.625, 'val_accuracy': 0.7,
                      'best_epoch': 3, 'selection': 'highest validation ROC AUC',
                      'operating_point': {'threshold': 0.3, 'test': point}},
          'not_covered': {'train_accuracy': 0.8}}


def test_summary_shows_balanced_accuracy_auc_baseline_and_operating_point():
  text = '\n'.join(results.summary_lines(_results('resnet18')))
  assert 'balanced 0.5000, ROC AUC 0.6000' in text and 'majority baseline 0.6250' in text
  assert 'threshold 0.3: test accuracy 0.7000, balanced 0.7200' in text


def test_offline_demo_from_scratch_names_the_model_that_learns_privately():
  note = results.SCATTERNET_DEMO_NOTE.format(numbers=results.SCATTERNET_DEMO_NUMBERS)
  assert note in results.summary_lines(_results('resnet18'))
  assert note not in results.summary_lines(_results('scatternet'))
  assert note not in results.summary_lines(_results('resnet18', pretrained=True))
  assert note not in results.summary_lines(_results('resnet18', data='/data/chest_xray'))
