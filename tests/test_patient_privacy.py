"""The patient as the privacy unit, through the real training step.

One patient added to a sampled batch (all of their images, in the middle of the batch so that
every later row shifts) moves the clipped gradient sum by exactly their clipped gradient:
norm C at most, also with augmentation multiplicity (views averaged before clipping). Ghost
clipping and the vmap reference take the same step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import secret_keys
from dpjax.data import datasets
from experiments import config_checks
from experiments import parallel
from experiments import steps
from experiments import train
from experiments.config_checks import ConfigError
from experiments.configs import default as default_config

CLIP = 0.01  # Small: every patient's summed gradient is clipped, so each moves the sum by C.
SLOTS = 2


def _config(**fields):
  config = default_config.get_config()
  config.update(dataset='pneumonia', mech='dpsgd', epochs=1, image_size=32, batch_size=4,
                microbatch_size=4, arch='tiny', weights='none', progress=False,
                max_images_per_patient=SLOTS, l2_norm_clip=CLIP, noise_multiplier=1e-30,
                learning_rate=1.0, weight_decay=0.0, augment=True)
  config.update(fields)
  return config


def _batch(units, chosen, capacity):
  """Rows of the chosen patients, SLOTS per patient (as the sampler lays them out)."""
  indices = np.zeros((capacity, SLOTS), np.int32)
  mask = np.zeros((capacity, SLOTS), bool)
  for row, unit in enumerate(chosen):
    members = units[unit][:SLOTS]
    indices[row, :len(members)] = members
    mask[row, :len(members)] = True
  return indices.reshape(-1), mask.reshape(-1)


@pytest.fixture
def data(tiny_data):
  return datasets.load_dataset('pneumonia', tiny_data['pneumonia'], 32)


def _updated_params(run, mesh, data, indices, mask):
  state = jax.tree.map(jnp.copy, run.state)  # The step donates its input state.
  state, _ = run.train_step(state, steps.load_batch(data.train, indices, mask, mesh))
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(state.params))])


def test_adding_one_patient_moves_the_clipped_sum_by_at_most_c(data):
  mesh = parallel.make_mesh(jax.devices()[:1])
  units = data.train.units()
  multi = [u for u, members in enumerate(units) if len(members) >= 2]
  assert multi, 'the tiny demo data should have patients with several images'
  patient = multi[0]
  others = [u for u in range(len(units)) if u != patient][:5]
  # The patient sits in the middle: every later unit's rows shift by SLOTS.
  with_patient = others[:2] + [patient] + others[2:]
  key = secret_keys.reproducible_secret_key(0, 'sensitivity')
  results = {}
  # Augmentation multiplicity: a patient's views are averaged and clipped with the patient.
  for method, augmult in (('ghost', 1), ('vmap', 1), ('ghost', 2)):
    config = _config(clipping_method=method, augmult=augmult)
    run = train.build_run(config, data, mesh, key)
    assert run.plan.privacy_unit == 'patient' and run.plan.rows_per_unit == SLOTS
    without = _updated_params(run, mesh, data, *_batch(units, others, 6))
    added = _updated_params(run, mesh, data, *_batch(units, with_patient, 6))
    # params' = params - lr * (clipped_sum + ~0 noise) / E with E = batch_size.
    results[method, augmult] = (without, added)
    moved = np.linalg.norm(added - without) * config.batch_size / config.learning_rate
    # Exactly the patient's clipped gradient: norm C (every unit is clipped at this C).
    assert moved == pytest.approx(CLIP, rel=2e-3), (method, moved)
  for got, want in zip(results['ghost', 1], results['vmap', 1]):
    np.testing.assert_allclose(got, want, atol=2e-6 * CLIP)


def test_auto_unit_is_patient_only_where_it_can_be_honoured():
  resolve = config_checks.resolve_privacy_unit
  assert resolve(_config(), True) == 'patient'
  assert resolve(_config(), False) == 'image'  # APTOS: no ids.
  assert resolve(_config(), True, unparsed_names=3) == 'image'  # Some files name no patient.
  # Fixed-size shuffled batches or the paper's groups cannot sample patients whole.
  assert resolve(_config(sampling='shuffled'), True) == 'image'
  assert resolve(_config(clip_group_size=4, sampling='shuffled', batch_size=8), True) == 'image'
  assert resolve(_config(protocol='paper'), True) == 'image'
  assert resolve(_config(mech='ldp'), True) == 'image'  # LDP protects images (k x per patient).
  for bad in (dict(sampling='shuffled'), dict(microbatch_size=3), dict(mech='ldp')):
    with pytest.raises(ConfigError, match='--'):
      resolve(_config(privacy_unit='patient', **bad), True)
  with pytest.raises(ConfigError, match='no patient ids'):
    resolve(_config(privacy_unit='patient'), False)
