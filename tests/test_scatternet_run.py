"""ScatterNet runs end to end: private feature statistics in the ledger, the cached-free path."""

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant
import pytest

from dpjax import accounting
from experiments import train
from experiments.configs import default as default_config


def _config(tiny_data, tmp_path, **fields):
  config = default_config.preset(arch='scatternet', demo_data=False)
  config.update(dataset='pneumonia', mech='dpsgd', data_dir=str(tiny_data['pneumonia']),
                epochs=2, image_size=32, batch_size=8, microbatch_size=8, eval_batch_size=16,
                progress=False, workdir=str(tmp_path / 'run'), epsilon=4.0)
  config.update(fields)
  return config


def test_data_norm_release_is_in_the_ledger_and_epsilon_is_the_composition(tiny_data, tmp_path):
  config = _config(tiny_data, tmp_path, feature_norm='data_norm', accountant='rdp',
                   feature_stats_noise_multiplier=6.0)
  results = train.train_and_evaluate(config)
  ledger = accounting.PrivacyLedger.from_dict(results['privacy_ledger'])
  assert [(e.name, e.noise_multiplier) for e in ledger.gaussian_events] == [('feature_stats', 6.0)]
  (run,) = ledger.runs
  event = dp_accounting.ComposedDpEvent([
      dp_accounting.GaussianDpEvent(6.0),
      dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
          run.sampling_prob, dp_accounting.GaussianDpEvent(run.noise_multiplier)), run.count)])
  want = rdp_privacy_accountant.RdpAccountant(
      orders=accounting.RDP_ORDERS).compose(event).get_epsilon(config.delta)
  assert float(results['epsilon']) == pytest.approx(want, rel=1e-9)
  assert float(results['epsilon']) <= 4.0 + 1e-6  # The steps were calibrated to the total.
  # The statistics are in the released model; they are not the defaults.
  assert results['release']['model_file']


def test_group_norm_scatternet_has_no_extra_release(tiny_data, tmp_path):
  results = train.train_and_evaluate(_config(tiny_data, tmp_path))
  ledger = accounting.PrivacyLedger.from_dict(results['privacy_ledger'])
  assert ledger.gaussian_events == ()
  assert results['model']['arch'] == 'scatternet' and results['model']['norm'] == 'group_norm'
  assert 'operating_point' in results['release']
