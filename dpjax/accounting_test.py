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
# A guard against the hangs these tests reproduce (minutes, or forever), not a speed test: a few
# seconds on an idle 2-core machine, so generous enough for a loaded one.
HANG_GUARD_S = 120

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


# --- One-off Gaussian releases (e.g. private feature normalisation statistics) ---

def _analytic_gaussian_delta(epsilon, noise_multiplier):
  """Balle & Wang (2018), Thm. 8: delta(eps) of a Gaussian mechanism, sensitivity 1, std z:
  Phi(1/(2z) - eps z) - e^eps Phi(-1/(2z) - eps z)."""
  z = noise_multiplier
  norm = scipy.stats.norm
  return norm.cdf(1 / (2 * z) - epsilon * z) - math.exp(epsilon) * norm.cdf(
      -1 / (2 * z) - epsilon * z)


def _analytic_gaussian_epsilon(noise_multiplier, delta):
  return scipy.optimize.brentq(
      lambda eps: _analytic_gaussian_delta(eps, noise_multiplier) - delta, 0, 200)


def test_gaussian_event_composes_with_poisson_steps_as_dp_accounting_does():
  z_norm, z, q, steps = 15.0, 9.7, 128 / 5218, 2038
  ledger = accounting.PrivacyLedger('poisson')
  ledger.record_gaussian(z_norm, 'feature_stats')
  ledger.record_steps(z, q, steps)
  expected_event = dp_accounting.ComposedDpEvent([
      dp_accounting.GaussianDpEvent(z_norm),
      dp_accounting.SelfComposedDpEvent(
          dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps),
  ])
  assert ledger.dp_event() == expected_event
  direct_pld = pld_privacy_accountant.PLDAccountant().compose(
      expected_event).get_epsilon(DELTA)
  direct_rdp = rdp_privacy_accountant.RdpAccountant().compose(
      expected_event).get_epsilon(DELTA)
  epsilons = ledger.epsilons(DELTA)
  # Epsilon about 0.38 <= 1: the same 1e-4 grid as dp-accounting's default.
  assert epsilons['pld'] == pytest.approx(direct_pld, rel=1e-6)
  assert epsilons['rdp'] == pytest.approx(direct_rdp, rel=1e-12)
  steps_only = accounting.PrivacyLedger('poisson')
  steps_only.record_steps(z, q, steps)
  assert epsilons['pld'] > steps_only.epsilon(DELTA) + 0.03  # The release costs budget.
  assert ledger.gaussian_events == (('feature_stats', z_norm, 1),)
  assert ledger.gaussian_events[0].name == 'feature_stats'
  with pytest.raises(AttributeError):
    ledger.gaussian_events = ()  # Read-only.


@pytest.mark.parametrize('z,count', [(2.0, 1), (0.8, 1), (3.0, 4)])
def test_gaussian_only_ledger_matches_analytic_gaussian_mechanism(z, count):
  delta = 1e-5
  ledger = accounting.PrivacyLedger('poisson')
  ledger.record_gaussian(z, 'stats', count=count)
  # count releases with std z: one Gaussian with std z / sqrt(count).
  exact = _analytic_gaussian_epsilon(z / math.sqrt(count), delta)
  pld = ledger.epsilon(delta, 'pld')
  assert pld == pytest.approx(exact, rel=2e-3)
  assert pld >= exact - 1e-9  # PLD is an upper bound,
  assert _analytic_gaussian_delta(pld, z / math.sqrt(count)) <= delta * (1 + 1e-6)
  assert ledger.epsilon(delta, 'rdp') >= exact  # and so is RDP.
  # The closed form is the same as the hockey-stick one used above for shuffled epochs.
  assert exact == pytest.approx(
      _gaussian_mechanism_epsilon(math.sqrt(count) / z, delta), rel=1e-9)


def test_shuffled_gaussian_event_has_doubled_sensitivity():
  z, delta = 4.0, 1e-5
  ledger = accounting.PrivacyLedger('shuffled', steps_per_epoch=10)
  ledger.record_gaussian(z, 'feature_stats')
  assert ledger.dp_event() == dp_accounting.GaussianDpEvent(z / 2)
  exact = _analytic_gaussian_epsilon(z / 2, delta)  # replace-one: shift 2 units of z
  assert ledger.epsilon(delta) == pytest.approx(exact, rel=2e-3)
  assert ledger.epsilon(delta) >= exact - 1e-9
  # With epochs: 2 epochs at z_sgd and the release, three Gaussians, mu^2 adds up.
  ledger.record_steps(6.0, 0.1, 20)
  mu = math.sqrt((2 / z)**2 + 2 * (2 / 6.0)**2)
  assert ledger.epsilon(delta) == pytest.approx(
      _gaussian_mechanism_epsilon(mu, delta), rel=2e-3)


@pytest.mark.parametrize('sampling,steps_per_epoch', [('poisson', None), ('shuffled', 7)])
def test_gaussian_events_round_trip_and_version_1_dicts_load(sampling, steps_per_epoch):
  ledger = accounting.PrivacyLedger(sampling, steps_per_epoch)
  ledger.record_gaussian(12.0, 'feature_stats')
  ledger.record_steps(3.0, 0.125, 40)
  ledger.record_gaussian(20.0, 'label_counts', count=2)
  state = json.loads(json.dumps(ledger.to_dict()))
  assert state['format_version'] == 2
  restored = accounting.PrivacyLedger.from_dict(state)
  assert restored.gaussian_events == ledger.gaussian_events == (
      ('feature_stats', 12.0, 1), ('label_counts', 20.0, 2))
  assert restored.runs == ledger.runs
  assert restored.dp_event() == ledger.dp_event()
  assert restored.epsilons(1e-5) == ledger.epsilons(1e-5)

  version_1 = {'format_version': 1, 'sampling': sampling, 'steps_per_epoch': steps_per_epoch,
               'runs': [[3.0, 0.125, 40]]}
  old = accounting.PrivacyLedger.from_dict(version_1)
  assert old.gaussian_events == ()
  assert old.runs == ((3.0, 0.125, 40),)
  steps_only = accounting.PrivacyLedger(sampling, steps_per_epoch)
  steps_only.record_steps(3.0, 0.125, 40)
  assert old.epsilons(1e-5) == steps_only.epsilons(1e-5)
  assert old.epsilon(1e-5) < ledger.epsilon(1e-5)


def test_record_gaussian_rejects_bad_arguments():
  ledger = accounting.PrivacyLedger('poisson')
  for bad in (-1.0, math.nan, math.inf, True, np.float64('nan'), np.array([1.0, 2.0])):
    with pytest.raises(ValueError, match='noise_multiplier'):
      ledger.record_gaussian(bad, 'x')
  with pytest.raises(ValueError, match='name'):
    ledger.record_gaussian(2.0, '')
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match='count'):
      ledger.record_gaussian(2.0, 'x', count=bad)
  assert ledger.gaussian_events == ()
  ledger.record_gaussian(0.0, 'no noise')  # Recorded: the release was not private at all.
  assert ledger.epsilon(1e-5) == math.inf


@pytest.mark.parametrize('accountant', ['pld', 'rdp'])
def test_calibration_with_extra_gaussian_releases_meets_the_total_target(accountant):
  target, delta, q, steps, z_norm = 1.0, 1e-5, 128 / 5218, 2038, 15.0
  plain = accounting.calibrate_noise_multiplier(target, delta, q, steps, accountant)
  z = accounting.calibrate_noise_multiplier(
      target, delta, q, steps, accountant, extra_gaussian_noise_multipliers=[z_norm])

  def total_epsilon(noise_multiplier):
    ledger = accounting.PrivacyLedger('poisson')
    ledger.record_gaussian(z_norm, 'feature_stats')
    ledger.record_steps(noise_multiplier, q, steps)
    return ledger.epsilon(delta, accountant)

  assert total_epsilon(z) <= target
  assert total_epsilon(0.999 * z) > target  # Within relative_tolerance = 1e-3.
  assert z > plain * 1.01  # The release's share of the budget needs more noise per step.


def test_calibration_refuses_extra_releases_that_spend_the_budget():
  start = time.monotonic()
  with pytest.raises(ValueError, match='extra Gaussian releases alone'):
    accounting.calibrate_noise_multiplier(
        0.5, 1e-5, 0.01, 1000, extra_gaussian_noise_multipliers=[2.0])
  with pytest.raises(ValueError, match='extra Gaussian releases alone'):
    accounting.calibrate_noise_multiplier(
        0.5, 1e-5, 0.01, 1000, extra_gaussian_noise_multipliers=[0.0])
  with pytest.raises(ValueError, match='extra_gaussian_noise_multipliers'):
    accounting.calibrate_noise_multiplier(
        0.5, 1e-5, 0.01, 1000, extra_gaussian_noise_multipliers=[math.nan])
  with pytest.raises(ValueError, match='extra_gaussian_noise_multipliers'):
    accounting.calibrate_noise_multiplier(
        0.5, 1e-5, 0.01, 1000, extra_gaussian_noise_multipliers=2.0)
  assert time.monotonic() - start < HANG_GUARD_S


# --- Robustness: every call finishes quickly or refuses with one ValueError ---

@pytest.mark.parametrize('relative_tolerance', [0, 0.0, -1e-3, 1.0, 2.0, math.nan, math.inf,
                                                1e-12, True])
def test_calibration_rejects_bad_relative_tolerance(relative_tolerance):
  with pytest.raises(ValueError, match='relative_tolerance'):
    accounting.calibrate_noise_multiplier(1.0, 1e-5, 0.01, 100,
                                          relative_tolerance=relative_tolerance)


def test_calibration_at_the_finest_tolerance_terminates():
  start = time.monotonic()
  q, steps = 128 / 5218, 2038
  z = accounting.calibrate_noise_multiplier(0.687, DELTA, q, steps, relative_tolerance=1e-9)
  assert time.monotonic() - start < HANG_GUARD_S
  ledger = accounting.PrivacyLedger('poisson')
  ledger.record_steps(z, q, steps)
  assert ledger.epsilon(DELTA) <= 0.687
  assert z == pytest.approx(5.0, rel=2e-3)


def test_huge_step_counts_answer_with_rdp_and_refuse_with_pld_quickly():
  q = 128 / 5218
  start = time.monotonic()
  with pytest.raises(accounting.AccountingTooCostly, match='accountant="rdp"'):
    accounting.calibrate_noise_multiplier(1.0, 1e-5, q, 10**9)
  with pytest.raises(ValueError, match='cannot finish quickly'):  # A ValueError.
    accounting.calibrate_noise_multiplier(1.0, 1e-5, q, 3e6)
  z = accounting.calibrate_noise_multiplier(1.0, 1e-5, q, 10**9, accountant='rdp')
  assert time.monotonic() - start < HANG_GUARD_S  # Was minutes ignoring Ctrl-C, and a MemoryError.
  ledger = accounting.PrivacyLedger('poisson')
  ledger.record_steps(z, q, 10**9)
  assert ledger.epsilon(1e-5, 'rdp') <= 1.0


def test_ledgers_with_huge_epsilon_or_steps_finish_quickly_with_an_upper_bound():
  q = 128 / 5218
  start = time.monotonic()
  tiny = accounting.PrivacyLedger('poisson')
  tiny.record_steps(1e-4, q, 2038)  # Was a 373 GiB allocation.
  rdp = tiny.epsilon(1e-5, 'rdp')
  assert 1e10 < rdp < math.inf
  # No grid fits and epsilon is astronomic: the PLD answer is the RDP bound.
  assert tiny.epsilon(1e-5, 'pld') == rdp
  many = accounting.PrivacyLedger('poisson')
  many.record_steps(5.0, q, 10**9)
  assert many.epsilon(1e-5) == many.epsilon(1e-5, 'rdp') > accounting.PLD_MAX_EPSILON
  long_run = accounting.PrivacyLedger('poisson')
  long_run.record_steps(10.0, 0.01, 10**6)  # A dense grid: still an answer, below RDP.
  assert 4 < long_run.epsilon(1e-6) < long_run.epsilon(1e-6, 'rdp')
  shuffled = accounting.PrivacyLedger('shuffled', steps_per_epoch=10**6)
  shuffled.record_steps(40.0, 1e-6, 10**9)  # 1000 epochs, never one array entry per step.
  shuffled.record_steps(30.0, 1e-6, 1)  # One more (partial) epoch.
  mu = math.sqrt(1000 * (2 / 40.0)**2 + (2 / 30.0)**2)
  assert shuffled.epsilon(1e-5) == pytest.approx(
      _gaussian_mechanism_epsilon(mu, 1e-5), rel=2e-3)
  assert time.monotonic() - start < HANG_GUARD_S


def test_pld_stays_a_pessimistic_upper_bound_on_coarse_grids():
  # Long runs get a grid sized to the budget: still above the tightest PLD we can afford
  # directly (a 1e-4 grid of this many steps is feasible here) and below RDP.
  q, z, steps = 0.01, 2.0, 5000
  ledger = accounting.PrivacyLedger('poisson')
  ledger.record_steps(z, q, steps)
  event = ledger.dp_event()
  fine = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-5).compose(
      event).get_epsilon(1e-5)
  pld = ledger.epsilon(1e-5)
  assert fine - 1e-9 <= pld <= ledger.epsilon(1e-5, 'rdp')
  assert pld == pytest.approx(fine, rel=2e-3)


def test_accounting_peak_memory_stays_below_one_gib():
  script = (
      'import resource\n'
      'from dpjax import accounting as a\n'
      'base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n'
      'for z, steps in ((1e-4, 2038), (5.002, 3 * 10**6), (10.0, 10**6)):\n'
      '  ledger = a.PrivacyLedger("poisson")\n'
      '  ledger.record_steps(z, 128 / 5218, steps)\n'
      '  ledger.epsilon(1e-5)\n'
      'print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)\n')
  import subprocess
  import sys
  out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                       timeout=120, check=True)
  assert int(out.stdout.strip().splitlines()[-1]) < 2**30  # Linux ru_maxrss is in KiB.


SCALAR_TYPES = [float, np.float64, np.float32, lambda x: np.asarray(x), 'jax']


def _as_type(value, kind):
  if kind == 'jax':
    import jax.numpy as jnp
    return jnp.asarray(value, jnp.float32)
  return kind(value)


@pytest.mark.parametrize('kind', SCALAR_TYPES)
def test_record_steps_refuses_non_finite_negative_and_bool_for_every_scalar_type(kind):
  ledger = accounting.PrivacyLedger('poisson')
  for bad in (math.nan, math.inf, -math.inf, -0.5):
    with pytest.raises(ValueError, match='noise_multiplier'):
      ledger.record_steps(_as_type(bad, kind), 0.1, 10)
  for bad in (math.nan, math.inf, 0.0, 1.5, -0.1):
    with pytest.raises(ValueError, match='sampling_prob'):
      ledger.record_steps(2.0, _as_type(bad, kind), 10)
  for bad_bool in (True, False, np.bool_(True)):
    with pytest.raises(ValueError, match='noise_multiplier'):
      ledger.record_steps(bad_bool, 0.1, 10)
    with pytest.raises(ValueError, match='sampling_prob'):
      ledger.record_steps(2.0, bad_bool, 10)
    with pytest.raises(ValueError, match='count'):
      ledger.record_steps(2.0, 0.1, bad_bool)
  for bad_count in (math.nan, 2.5, -1):
    with pytest.raises(ValueError, match='count'):
      ledger.record_steps(2.0, 0.1, _as_type(bad_count, kind))
  assert ledger.runs == ()
  ledger.record_steps(_as_type(2.0, kind), _as_type(0.25, kind), _as_type(10, kind))
  assert ledger.runs == ((2.0, 0.25, 10),)
  assert all(type(value) in (float, int) for value in ledger.runs[0])


@pytest.mark.parametrize('kind', SCALAR_TYPES)
def test_calibration_and_epsilon_validate_every_argument_for_every_scalar_type(kind):
  ledger = accounting.PrivacyLedger('poisson')
  ledger.record_steps(2.0, 0.01, 100)
  calibrate = accounting.calibrate_noise_multiplier
  for bad in (math.nan, math.inf, 0.0, 1.0, -1e-5):
    with pytest.raises(ValueError, match='delta'):
      ledger.epsilon(_as_type(bad, kind))
    with pytest.raises(ValueError, match='delta'):
      calibrate(1.0, _as_type(bad, kind), 0.01, 100)
  for bad in (math.nan, math.inf, 0.0, -1.0):
    with pytest.raises(ValueError, match='target_epsilon'):
      calibrate(_as_type(bad, kind), 1e-5, 0.01, 100)
  for bad in (math.nan, math.inf, 0.0, 1.01):
    with pytest.raises(ValueError, match='sampling_prob'):
      calibrate(1.0, 1e-5, _as_type(bad, kind), 100)
  for bad in (math.nan, math.inf, 0.0, -3.0, 2.5):
    with pytest.raises(ValueError, match='steps'):
      calibrate(1.0, 1e-5, 0.01, _as_type(bad, kind))
  for bad in (math.nan, 0.0, -1.0):
    with pytest.raises(ValueError, match='min_noise_multiplier'):
      calibrate(1.0, 1e-5, 0.01, 100, min_noise_multiplier=_as_type(bad, kind))
  for bad_bool in (True, np.bool_(False)):
    with pytest.raises(ValueError, match='delta'):
      ledger.epsilon(bad_bool)
    with pytest.raises(ValueError, match='steps'):
      calibrate(1.0, 1e-5, 0.01, bad_bool)
    with pytest.raises(ValueError, match='target_epsilon'):
      calibrate(bad_bool, 1e-5, 0.01, 100)
  z = calibrate(_as_type(1.0, kind), _as_type(1e-5, kind), _as_type(0.01, kind),
                _as_type(100, kind), accountant='rdp')
  assert isinstance(z, float) and z > accounting.MIN_NOISE_MULTIPLIER
  delta = _as_type(1e-5, kind)
  assert ledger.epsilon(delta) == ledger.epsilon(float(delta))  # float32 1e-5 is not 1e-5.


def test_steps_per_epoch_is_validated():
  for bad in (0, -2, 2.5, True, math.nan):
    with pytest.raises(ValueError, match='steps_per_epoch'):
      accounting.PrivacyLedger('shuffled', steps_per_epoch=bad)
  assert accounting.PrivacyLedger('shuffled', np.int64(7)).steps_per_epoch == 7


def test_many_distinct_runs_refuse_pld_quickly_and_answer_with_rdp():
  ledger = accounting.PrivacyLedger('poisson')
  for i in range(accounting._PLD_MAX_COMPONENTS + 1):
    ledger.record_steps(20.0 + i, 0.01, 10)  # A noise schedule changing every 10 steps.
  start = time.monotonic()
  with pytest.raises(accounting.AccountingTooCostly, match='distinct'):
    ledger.epsilon(1e-5)
  assert 0 < ledger.epsilon(1e-5, 'rdp') < 1
  assert time.monotonic() - start < HANG_GUARD_S


# The README's main command: pneumonia demo, 424 training patients, batch 64, 10 epochs of
# round(424 / 64) = 7 steps; the noise calibrated to epsilon 1 (and 8) under add/remove.
MAIN_COMMAND = dict(sampling_prob=64 / 424, steps=70, delta=1e-5)


@pytest.mark.parametrize('target, replace_one', [(1.0, 2.05), (8.0, 12.43)])
def test_replace_one_epsilon_of_the_main_command(target, replace_one):
  q, steps, delta = MAIN_COMMAND['sampling_prob'], MAIN_COMMAND['steps'], MAIN_COMMAND['delta']
  z = accounting.calibrate_noise_multiplier(target, delta, q, steps)
  ledger = accounting.PrivacyLedger('poisson')
  ledger.record_steps(z, q, steps)
  epsilon, method = ledger.replace_one_epsilon(delta)
  assert method == accounting.REPLACE_ONE_PLD
  # Once the count is public the neighbours are replace-one: about twice the printed epsilon.
  assert epsilon == pytest.approx(replace_one, abs=0.01)
  assert ledger.epsilon(delta) <= target < epsilon
  # Tighter than group privacy of size 2, the bound that needs no replace-one analysis.
  assert epsilon <= accounting._group_of_two_epsilon(ledger.dp_event(), delta)
  # Exactly dp-accounting's REPLACE_ONE PLD of the same steps.
  reference = pld_privacy_accountant.PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE)
  reference.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
  assert epsilon == pytest.approx(reference.get_epsilon(delta), rel=1e-3)


def test_replace_one_epsilon_of_a_gaussian_release_doubles_the_shift():
  z, delta = 4.0, 1e-5
  ledger = accounting.PrivacyLedger('poisson')
  ledger.record_gaussian(z, 'feature_stats')
  exact = _analytic_gaussian_epsilon(z / 2, delta)  # A replaced unit shifts the sum by 2 units.
  epsilon, _ = ledger.replace_one_epsilon(delta)
  assert epsilon == pytest.approx(exact, rel=2e-3) and epsilon >= exact - 1e-9


def test_replace_one_epsilon_of_a_shuffled_ledger_is_its_epsilon():
  ledger = accounting.PrivacyLedger('shuffled', steps_per_epoch=10)
  ledger.record_steps(3.0, 0.1, 30)
  for name in accounting.ACCOUNTANTS:
    assert ledger.replace_one_epsilon(1e-5, name)[0] == ledger.epsilon(1e-5, name)
  assert accounting.PrivacyLedger().replace_one_epsilon(1e-5)[0] == 0.0
  none = accounting.PrivacyLedger()
  none.record_steps(0.0, 0.1, 1)
  assert math.isinf(none.replace_one_epsilon(1e-5)[0])


def test_replace_one_epsilon_falls_back_to_group_privacy_beyond_the_pld_budget(monkeypatch):
  ledger = accounting.PrivacyLedger('poisson')
  ledger.record_steps(2.0, 0.05, 500)
  pld, _ = ledger.replace_one_epsilon(1e-5)
  monkeypatch.setattr(accounting, '_PLD_MAX_POINTS', 10)
  group, method = ledger.replace_one_epsilon(1e-5)
  assert method == accounting.REPLACE_ONE_GROUP
  assert pld <= group < 2 * ledger.epsilon(1e-5, 'rdp') + 1  # A valid, looser upper bound.


def test_calibration_agrees_with_dp_accounting_calibrate_dp_mechanism():
  # The maintained calibration, on the event the ledger records for Poisson DP-SGD.
  q, steps, target, delta = 0.05, 200, 2.0, 1e-5
  ours = accounting.calibrate_noise_multiplier(target, delta, q, steps, relative_tolerance=1e-4)

  def event(z):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)

  theirs = dp_accounting.calibrate_dp_mechanism(
      pld_privacy_accountant.PLDAccountant, event, target, delta,
      dp_accounting.LowerEndpointAndGuess(0.3, 1.0), tol=1e-5)
  assert ours == pytest.approx(theirs, rel=2e-4)
