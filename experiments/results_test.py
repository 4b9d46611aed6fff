"""The console summary: the scores that matter beside accuracy, and the model that learns."""

import math

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


def _first_line(**config):
  r = _results('resnet18')
  r['config'].update(config)
  return results.summary_lines(r)[0]


def test_the_summary_names_what_set_the_noise():
  # An --epsilon=8 run printed '(beta=1)', the default beta that played no part.
  assert '(target epsilon 8)' in _first_line(epsilon=8.0) and 'beta' not in _first_line(epsilon=8.0)
  fixed = _first_line(noise_multiplier=1.5)
  assert '(noise multiplier 1.5, fixed)' in fixed and 'beta' not in fixed
  assert '(target epsilon 1, beta=1)' in _first_line()
  ldp = {**_results('resnet18'), 'mech': 'ldp', 'beta': 2.0}
  assert '(beta=2)' in results.summary_lines(ldp)[0]


def _summary(dataset, mech):
  import types
  from dpjax import accounting
  from experiments.configs import default
  from experiments.privacy_plan import PrivacyPlan
  config = default.get_config()
  config.update(dataset=dataset, mech=mech)
  ledger = accounting.PrivacyLedger('poisson')
  ledger.record_steps(1.0, 0.05, 100)
  plan = PrivacyPlan(mech=mech, noise_multiplier=1.0, accounted_noise_multiplier=1.0,
                     sampling_prob=0.05, steps=100, target_epsilon=1.0, num_units=1000)
  data = types.SimpleNamespace(train=types.SimpleNamespace(patients=None), patients=None,
                               prep_size=9)
  return results.privacy_summary(config, plan, ledger, data)


def test_aptos_guarantees_say_a_patient_has_two_eyes():
  # APTOS is image unit, and its images are eyes: a patient with both eyes in the data has two
  # images, so per patient the guarantee is the group guarantee of two, 2x epsilon.
  dpsgd = _summary('aptos', 'dpsgd')
  eps, delta = dpsgd['epsilon'], dpsgd['delta']
  assert results.APTOS_EYES_NOTE in dpsgd['guarantee']
  assert f'per patient only ({2 * eps:.3g}, {(1 + math.exp(eps)) * delta:.3g})-DP' in dpsgd['guarantee']
  ldp = _summary('aptos', 'ldp')
  assert f'per patient only {2 * ldp["epsilon"]:g}' in ldp['guarantee']
  for mech in ('dpsgd', 'ldp'):
    assert results.APTOS_EYES_NOTE not in _summary('pneumonia', mech)['guarantee']


def test_published_lines_come_from_the_release_alone():
  full = {**_results('resnet18'), 'split_sizes': {'train': 734}, 'data_fingerprint': 'ab',
          'not_covered': {'train_accuracy': 0.8123}}
  published = results.published_summary_lines(results.public_release(full))
  lines = results.summary_lines(full)
  # The curator's lines (not-covered train accuracy, where results.json is) are the others.
  curator = [line for line in lines if line not in published]
  assert [line.split()[0] for line in curator] == ['train', 'results:']
  assert all('not covered' in line for line in curator)
  assert [line for line in lines if line in published] == published
  assert not any('0.8123' in line for line in published)  # The train accuracy.


def test_counts_of_training_images_stay_out_of_the_release():
  full = {**_results('resnet18'), 'split_sizes': {'train': 734, 'val': 60, 'test': 624},
          'split_patients': {'train': 424, 'val': 30, 'test': 400}, 'privacy_units_in_train': 424}
  release = results.public_release(full)
  assert 'split_sizes' not in release and 'split_patients' not in release
  assert release['privacy_units_in_train'] == 424  # Published: replace-one holds with it.
  assert set(results.PRIVATE_ONLY) <= set(results.disclosure()['private_counts'])


def test_undeclared_differences_name_what_would_tell_neighbours_apart():
  first = {'privacy_units_in_train': 424, 'epsilon_replace_one': 2.05, 'split_sizes': {'train': 734},
           'release': {'test_accuracy': 0.8, 'history': [{'step': 7, 'val_loss': 0.5, 'count': 1}]}}
  second = {'privacy_units_in_train': 423, 'epsilon_replace_one': 2.06, 'split_sizes': {'train': 733},
            'release': {'test_accuracy': 0.7, 'history': [{'step': 6, 'val_loss': 0.4, 'count': 2}]}}
  assert results.release_differences(first, second) == [
      'epsilon_replace_one', 'privacy_units_in_train', 'release.history[].count',
      'release.history[].step', 'release.history[].val_loss', 'release.test_accuracy',
      'split_sizes.train']
  assert results.undeclared_differences(first, second) == ['release.history[].count',
                                                           'split_sizes.train']
  assert all(reason for reason in results.PUBLISHED_PUBLIC_FIELDS.values())
