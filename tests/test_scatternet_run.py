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


@pytest.mark.parametrize('feature_norm', ['group_norm', 'data_norm'])
def test_cached_features_give_the_uncached_run(tiny_data, tmp_path, feature_norm):
  """Scattering each image once (no augmentation) trains the same model as scattering it at
  every step: same secret noise (one --noise_seed, the cache flag is not part of the run's
  identity), same metrics and parameters up to float rounding."""
  import numpy as np
  from flax import serialization
  runs = {}
  for cached in (True, False):
    config = _config(tiny_data, tmp_path / str(cached), feature_norm=feature_norm, noise_seed=7,
                     cache_features=cached, epsilon=8.0)
    runs[cached] = train.train_and_evaluate(config)
  with_cache, without = runs[True], runs[False]
  assert with_cache['release']['best_epoch'] == without['release']['best_epoch']
  for key in ('accuracy', 'balanced_accuracy', 'roc_auc'):
    assert with_cache['release']['test_metrics'][key] == pytest.approx(
        without['release']['test_metrics'][key], abs=1e-6)
  models = [serialization.msgpack_restore(
      (tmp_path / str(cached) / 'run' / 'release' / 'model.msgpack').read_bytes())
            for cached in (True, False)]
  for a, b in zip(*(jax_leaves(m) for m in models)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def jax_leaves(tree):
  import jax
  return jax.tree.leaves(tree)
