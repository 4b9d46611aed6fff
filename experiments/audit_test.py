"""The run's audits: the membership attack's non-members, and the console lines."""

import numpy as np
import pytest

from experiments import audit


class _NoValidation(dict):
  """Evaluation results whose validation entry may not be read."""

  def __getitem__(self, name):
    if name == 'val':
      raise AssertionError('the membership audit read the validation split')
    return super().__getitem__(name)

  def get(self, name, default=None):
    return self[name] if name in self else default


def _final(num_train=40, num_test=20, seed=0):
  rng = np.random.default_rng(seed)
  split = lambda n, shift: {'loss': rng.exponential(size=n) + shift,
                            'labels': np.arange(n) % 2}
  return _NoValidation(train=split(num_train, 0.0), val=split(10, 5.0),
                       test=split(num_test, 0.5))


def test_membership_audit_never_reads_validation_data():
  final = _final()
  result = audit.membership_audit(final, 1e-5, 0)
  assert result['loss_threshold']['num_nonmembers'] == 20  # The test split.
  assert result['loss_threshold']['num_members'] == 40
  assert result['nonmembers'].startswith('test split') and result['nonmembers_left_out'] == 0
  for attack in ('loss_threshold', 'class_calibrated'):
    a = result[attack]
    assert 0.0 <= a['epsilon_lower_bound'] <= a['epsilon_lower_bound_max']


def test_membership_audit_leaves_out_shared_patient_test_images():
  final = _final()
  keep = np.arange(20) >= 5
  result = audit.membership_audit(final, 1e-5, 0, keep)
  assert result['loss_threshold']['num_nonmembers'] == 15 and result['nonmembers_left_out'] == 5
  assert 'patients' in result['nonmembers']

  class Split:
    def __init__(self, patients):
      self.patients = None if patients is None else np.asarray(patients)

  class Data:
    train, test = Split([0, 0, 1, 2]), Split([2, 3, 3, 1, 4])

  assert audit.shared_patient_test_images(Data).tolist() == [True, False, False, True,
                                                                   False]
  Data.train = Split(None)
  assert audit.shared_patient_test_images(Data) is None


def test_summary_lines_show_each_bound_beside_its_attainable_maximum():
  results = {
      'release': {'audit': {'canaries': {
          'num_canaries': 1000, 'num_guesses': 1000, 'num_correct': 530,
          'epsilon_lower_bound': 0.0, 'epsilon_lower_bound_max': 5.78,
          'verdict': 'CANNOT TEST the claimed epsilon 8: ...'}}},
      'not_covered': {'audit': {'membership': audit.membership_audit(_final(), 1e-5, 0)}}}
  curator = audit.summary_lines(results, curator=True)
  assert len(curator) == 2
  assert 'epsilon >= 0 (at most 5.78 attainable); CANNOT TEST the claimed epsilon 8' in curator[0]
  assert curator[1].count('attainable') == 2  # Both membership attacks.
  assert audit.summary_lines(results, curator=False) == curator[:1]  # The attack is not covered.
  assert audit.summary_lines({'release': {}}, curator=True) == []


def test_grid_table_shows_the_membership_bound_beside_its_maximum():
  from experiments import report
  row = {'mia_auc': 0.5, 'mia_epsilon_lower_bound': 0.1, 'mia_epsilon_lower_bound_max': 6.49}
  assert report._audit_text(row) == '0.500 / 0.10 (max 6.49)'  # pylint: disable=protected-access


def test_canary_audit_of_a_run_names_a_conditional_claim_under_a_public_seed():
  import jax
  from dpjax.audit import canaries
  params = {'w': np.zeros(1000, np.float32)}
  made = canaries.make_gradient_canaries(jax.random.key(0), params, 1000)
  secret = audit.canary_audit(made, params, 1e-5, 0.5, seed_public=False)
  assert secret['claimed_epsilon'] == 0.5 and secret['can_test_claim']
  assert secret['epsilon_lower_bound_max'] == pytest.approx(4.17, abs=0.005)
  public = audit.canary_audit(made, params, 1e-5, 0.5, seed_public=True)
  assert 'claimed_epsilon' not in public and public['claimed_epsilon_if_seed_secret'] == 0.5


if __name__ == '__main__':
  pytest.main([__file__])
