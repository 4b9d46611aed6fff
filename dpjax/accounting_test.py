"""Known-answer tests of the privacy ledger and noise calibration."""

import json
import math
import time

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
import numpy as np
import pytest
import scipy.optimize
import scipy.stats

from dpjax import accounting

# (num_examples, noise_multiplier, steps, RDP eps, PLD eps) at delta = 1e-4,
# batch 128, Poisson: FACTS.md, measured with dp-accounting 0.6.
PAPER_SETTINGS = [
    (5218, 5.002, 2038, 0.769, 0.687),
    (5218, 9.7, 2038, 0.364, 0.322),
    (5218, 19.55, 2038, 0.166, 0.146),
    (2929, 6.6, 1144, 0.776, 0.692),
]
DELTA = 1e-4


def _gaussian_mechanism_epsilon(mu, delta):
  """Exact epsilon of a Gaussian mechanism with sensitivity / std = mu."""
  def delta_at(eps):
    norm = scipy.stats.norm
    return (norm.cdf(-eps / mu + mu / 2)
            - math.exp(eps) * norm.cdf(-eps / mu - mu / 2))
  return scipy.optimize.brentq(lambda eps: delta_at(eps) - delta, 0, 100)


@pytest.mark.parametrize('num_examples,z,steps,rdp_eps,pld_eps',
                         PAPER_SETTINGS)
def test_paper_settings_match_dp_accounting_and_reference(
    num_examples, z, steps, rdp_eps, pld_eps):
  q = 128 / num_examples
  ledger = accounting.PrivacyLedger('poisson')
  ledger.record_steps(z, q, steps)
  start = time.perf_counter()
  epsilons = ledger.epsilons(DELTA)
  assert time.perf_counter() - start < 1.0

  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)),
      steps)
  direct_pld = pld_privacy_accountant.PLDAccountant().compose(
      event).get_epsilon(DELTA)
  direct_rdp = rdp_privacy_accountant.RdpAccountant().compose(
      event).get_epsilon(DELTA)
  assert epsilons['pld'] == pytest.approx(direct_pld, rel=1e-9)
  assert epsilons['rdp'] == pytest.approx(direct_rdp, rel=1e-9)
  assert epsilons['pld'] == pytest.approx(pld_eps, abs=1e-3)
  assert epsilons['rdp'] == pytest.approx(rdp_eps, abs=1e-3)
  assert ledger.neighbouring_relation == 'add_or_remove_one'


def test_run_length_compaction_and_step_count():
  ledger = accounting.PrivacyLedger('poisson')
  for _ in range(300):
    ledger.record_step(2.0, 0.01)
  ledger.record_steps(3.0, 0.01, 50)
  ledger.record_step(3.0, 0.01)
  ledger.record_steps(2.0, 0.01, 0)  # nothing taken, nothing recorded
  assert ledger.runs == ((2.0, 0.01, 300), (3.0, 0.01, 51))
  assert ledger.num_steps == 351

  bulk = accounting.PrivacyLedger('poisson')
  bulk.record_steps(2.0, 0.01, 300)
  bulk.record_steps(3.0, 0.01, 51)
  assert ledger.epsilon(1e-5) == bulk.epsilon(1e-5)
  # More steps never lower epsilon.
  bulk.record_step(3.0, 0.01)
  assert bulk.epsilon(1e-5) > ledger.epsilon(1e-5)


@pytest.mark.parametrize('sampling,steps_per_epoch', [('poisson', None),
                                                      ('shuffled', 7)])
def test_to_dict_from_dict_round_trip_through_json(sampling, steps_per_epoch):
  ledger = accounting.PrivacyLedger(sampling, steps_per_epoch)
  ledger.record_steps(3.0, 0.125, 40)
  ledger.record_steps(3.5, 0.125, 9)
  restored = accounting.PrivacyLedger.from_dict(
      json.loads(json.dumps(ledger.to_dict())))
  assert restored.runs == ledger.runs
  assert restored.sampling == sampling
  assert restored.epsilons(1e-5) == ledger.epsilons(1e-5)
  with pytest.raises(ValueError, match='format_version'):
    accounting.PrivacyLedger.from_dict({**ledger.to_dict(),
                                        'format_version': 99})


def test_no_steps_is_zero_epsilon_and_no_noise_is_infinite():
  ledger = accounting.PrivacyLedger('poisson')
  assert ledger.epsilon(1e-5) == 0.0
  ledger.record_step(0.0, 0.1)
  assert ledger.epsilon(1e-5, 'pld') == math.inf
  assert ledger.epsilon(1e-5, 'rdp') == math.inf


def test_shuffled_is_one_gaussian_of_sensitivity_2c_per_epoch():
  z, steps_per_epoch = 4.0, 10
  ledger = accounting.PrivacyLedger('shuffled', steps_per_epoch)
  ledger.record_steps(z, 0.1, 25)  # 2.5 epochs count as 3
  assert ledger.neighbouring_relation == 'replace_one'

  # 3 epochs of a Gaussian with distance 2C and std zC: mu = sqrt(3) * 2 / z.
  exact = _gaussian_mechanism_epsilon(math.sqrt(3) * 2 / z, 1e-5)
  assert ledger.epsilon(1e-5, 'pld') == pytest.approx(exact, rel=2e-3)
  assert ledger.epsilon(1e-5, 'pld') >= exact - 1e-9  # PLD is pessimistic
  assert ledger.epsilon(1e-5, 'rdp') >= exact
  # dp-accounting's PLD under REPLACE_ONE reads GaussianDpEvent(z) as a 2C
  # shift, the same mechanism: both conventions agree.
  replace_one = pld_privacy_accountant.PLDAccountant(
      dp_accounting.NeighboringRelation.REPLACE_ONE)
  replace_one.compose(dp_accounting.GaussianDpEvent(z), 3)
  assert ledger.epsilon(1e-5) == pytest.approx(
      replace_one.get_epsilon(1e-5), rel=1e-3)


def test_shuffled_epoch_uses_its_smallest_noise_multiplier():
  ledger = accounting.PrivacyLedger('shuffled', steps_per_epoch=3)
  ledger.record_steps(10.0, 0.3, 3)  # epoch 0: z = 10
  ledger.record_steps(10.0, 0.4, 2)  # epoch 1 mixes z = 10 and z = 1
  ledger.record_steps(1.0, 0.4, 1)
  ledger.record_steps(10.0, 0.4, 7)  # epochs 2, 3 and a partial epoch 4
  expected = dp_accounting.ComposedDpEvent([
      dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(5.0), 1),
      dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(0.5), 1),
      dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(5.0), 3),
  ])
  assert ledger.dp_event() == expected


def test_shuffled_default_epoch_length_never_undercounts():
  # Without steps_per_epoch: floor(1 / q) = 3 steps per epoch, smallest z.
  ledger = accounting.PrivacyLedger('shuffled')
  ledger.record_steps(6.0, 0.3, 5)
  ledger.record_steps(4.0, 0.3, 2)
  assert ledger.dp_event() == dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(2.0), 3)
  # And it is far more expensive than Poisson sampling at the same q.
  poisson = accounting.PrivacyLedger('poisson')
  poisson.record_steps(4.0, 0.3, 7)
  assert ledger.epsilon(1e-5) > poisson.epsilon(1e-5)


def test_calibrate_noise_multiplier_recovers_paper_noise():
  q, steps = 128 / 5218, 2038
  target = accounting.PrivacyLedger('poisson')
  target.record_steps(5.002, q, steps)
  target_epsilon = target.epsilon(DELTA)  # about 0.687

  z = accounting.calibrate_noise_multiplier(target_epsilon, DELTA, q, steps)

  def epsilon(noise_multiplier):
    ledger = accounting.PrivacyLedger('poisson')
    ledger.record_steps(noise_multiplier, q, steps)
    return ledger.epsilon(DELTA)

  assert epsilon(z) <= target_epsilon
  assert epsilon(0.99 * z) > target_epsilon
  assert z == pytest.approx(5.002, rel=2e-3)


def test_calibrate_shuffled_matches_closed_form_gaussian():
  target_epsilon, delta, epochs = 2.0, 1e-5, 4
  z = accounting.calibrate_noise_multiplier(
      target_epsilon, delta, sampling_prob=0.25, steps=4 * epochs,
      accountant='rdp', sampling='shuffled', steps_per_epoch=4)
  # RDP of a Gaussian is exact per order; its epsilon is >= the exact one.
  assert _gaussian_mechanism_epsilon(math.sqrt(epochs) * 2 / z, delta) <= (
      target_epsilon)
  ledger = accounting.PrivacyLedger('shuffled', 4)
  ledger.record_steps(0.99 * z, 0.25, 4 * epochs)
  assert ledger.epsilon(delta, 'rdp') > target_epsilon


def test_rejects_bad_arguments():
  with pytest.raises(ValueError, match='sampling'):
    accounting.PrivacyLedger('shuffle')
  with pytest.raises(ValueError, match='steps_per_epoch'):
    accounting.PrivacyLedger('poisson', steps_per_epoch=3)
  ledger = accounting.PrivacyLedger('poisson')
  with pytest.raises(ValueError, match='sampling_prob'):
    ledger.record_step(1.0, 1.5)
  with pytest.raises(ValueError, match='accountant'):
    ledger.epsilon(1e-5, accountant='moments')
  with pytest.raises(ValueError, match='delta'):
    ledger.epsilon(0.0)
  with pytest.raises(ValueError, match='target_epsilon'):
    accounting.calibrate_noise_multiplier(0.0, 1e-5, 0.01, 100)
  assert np.isfinite(accounting.calibrate_noise_multiplier(
      1.0, 1e-5, 0.01, 100, accountant='rdp'))


def test_calibration_refuses_at_once_when_almost_no_noise_is_needed():
  start = time.perf_counter()
  with pytest.raises(accounting.EssentiallyNoPrivacy, match='essentially no privacy'):
    accounting.calibrate_noise_multiplier(target_epsilon=1e6, delta=1e-5, sampling_prob=0.15,
                                          steps=12)
  with pytest.raises(accounting.EssentiallyNoPrivacy):
    accounting.calibrate_noise_multiplier(target_epsilon=1e4, delta=1e-5, sampling_prob=0.15,
                                          steps=12, accountant='rdp')
  assert time.perf_counter() - start < 5  # Was a silent search of minutes (1e4) or a hang (1e6).
  # Just above the floor it still answers, and never below the floor.
  z = accounting.calibrate_noise_multiplier(target_epsilon=20.0, delta=1e-5, sampling_prob=0.15,
                                            steps=12)
  assert z >= accounting.MIN_NOISE_MULTIPLIER
  ledger = accounting.PrivacyLedger('poisson')
  ledger.record_steps(z, 0.15, 12)
  assert ledger.epsilon(1e-5) <= 20.0
