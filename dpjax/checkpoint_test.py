import jax
import jax.numpy as jnp
import numpy as np

from dpjax import checkpoint


def _state(seed):
  key = jax.random.key(seed)
  return {'params': {'w': jax.random.normal(key, (3, 2))}, 'step': jnp.int32(seed),
          'rng': jax.random.fold_in(key, 7), 'nested': (jnp.arange(4.0), {})}


def test_round_trip_keeps_values_keys_and_meta(tmp_path):
  ckpt = checkpoint.RunCheckpointer(tmp_path)
  assert ckpt.latest_step() is None
  state, best = _state(1), {'params': {'w': jnp.ones((3, 2))}}
  meta = {'ledger': {'runs': [[1.5, 0.01, 7]]}, 'history': [{'epoch': 1, 'val_loss': 0.3}]}
  ckpt.save(7, state, best, meta, {'private_key': [1, 2]})
  ckpt.save(9, _state(2), best, {**meta, 'step': 9}, {'private_key': [3, 4]})
  assert ckpt.latest_step() == 9
  restored_state, restored_best, restored_meta = ckpt.restore(7, _state(0), best)
  np.testing.assert_array_equal(restored_state['params']['w'], state['params']['w'])
  assert int(restored_state['step']) == 1
  # The restored key draws the same numbers as the saved one.
  np.testing.assert_array_equal(jax.random.normal(restored_state['rng'], (5,)),
                                jax.random.normal(state['rng'], (5,)))
  np.testing.assert_array_equal(restored_best['params']['w'], 1.0)
  assert restored_meta == meta
  assert ckpt.restore_secret(7) == {'private_key': [1, 2]}
  ckpt.close()
  # Private artifact: only the owner may read the checkpoints.
  assert (tmp_path / 'checkpoints').stat().st_mode & 0o077 == 0


def test_only_the_newest_checkpoints_are_kept(tmp_path):
  ckpt = checkpoint.RunCheckpointer(tmp_path, max_to_keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), {'b': jnp.zeros(1)}, {'step': step}, {})
  assert sorted(p.name for p in ckpt.directory.iterdir() if p.name.isdigit()) == ['2', '3']
  ckpt.close()
