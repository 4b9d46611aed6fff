"""Known-answer and statistical tests of the DP-SGD transformations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from dpjax import clipping
from dpjax import transforms
from dpjax import sampling


def _params():
  return {'w': jnp.zeros((3,)), 'b': {'c': jnp.zeros((2, 2))}}


def _per_example_grads(seed, batch_size=5):
  rng = np.random.default_rng(seed)  # test data only
  row_scale = np.geomspace(0.1, 4.0, batch_size)
  return {
      'w': (rng.normal(size=(batch_size, 3))
            * row_scale[:, None]).astype(np.float32),
      'b': {'c': (rng.normal(size=(batch_size, 2, 2))
                  * row_scale[:, None, None]).astype(np.float32)},
  }


def _update(tx, grads, state, jit, mask=None):
  update = jax.jit(tx.update) if jit else tx.update
  return update(transforms.PerExampleGrads(grads, mask), state, _params())


def _dp_sgd(clip, noise_multiplier, key, expected_batch_size, **kwargs):
  return transforms.dp_sgd(clip, noise_multiplier=noise_multiplier, key=key,
                           expected_batch_size=expected_batch_size, **kwargs)


@pytest.mark.parametrize('jit', [False, True])
def test_no_noise_infinite_clip_chained_with_sgd_is_mean_gradient_step(jit):
  grads = _per_example_grads(0)
  learning_rate = 0.1
  tx = optax.chain(
      transforms.dp_sgd(l2_norm_clip=jnp.inf, noise_multiplier=0.0,
                        key=jax.random.key(0), expected_batch_size=5),
      optax.sgd(learning_rate))
  updates, _ = _update(tx, grads, tx.init(_params()), jit)
  for got, per_example in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, -learning_rate * per_example.mean(0),
                               rtol=1e-5)


@pytest.mark.parametrize('jit', [False, True])
def test_no_noise_small_clip_is_mean_of_clipped_grads(jit):
  grads = _per_example_grads(1)
  clip = 1.0
  norms = np.sqrt(np.sum(grads['w']**2, 1) + np.sum(grads['b']['c']**2, (1, 2)))
  assert 0 < np.sum(norms > clip) < 5
  factors = np.minimum(1, clip / norms)
  tx = _dp_sgd(clip, 0.0, jax.random.key(0), 5, return_clip_stats=True)

  updates, state = _update(tx, grads, tx.init(_params()), jit)

  np.testing.assert_allclose(
      updates['w'], np.mean(grads['w'] * factors[:, None], 0), rtol=1e-5)
  np.testing.assert_allclose(
      updates['b']['c'], np.mean(grads['b']['c'] * factors[:, None, None], 0),
      rtol=1e-5)
  # Clip statistics land in the state for logging, when asked for.
  assert int(state.count) == 1
  np.testing.assert_allclose(state.clip_stats.fraction_clipped,
                             np.mean(norms > clip))
  np.testing.assert_allclose(state.clip_stats.mean_norm, norms.mean(),
                             rtol=1e-5)


@pytest.mark.parametrize('jit', [False, True])
def test_padding_changes_nothing_and_divisor_is_expected_batch_size(jit):
  grads = _per_example_grads(2, batch_size=6)
  mask = np.array([True, False, True, True, False, True])
  grads['w'][1] = np.nan
  grads['b']['c'][4] = 1e30
  real = jax.tree.map(lambda x: x[mask], grads)
  # Expected size 10 differs from the realised 4: the divisor must be 10.
  make_tx = lambda: optax.chain(
      _dp_sgd(0.5, 0.0, jax.random.key(0), 10, return_clip_stats=True),
      optax.identity())
  tx = make_tx()
  padded_updates, padded_state = _update(tx, grads, tx.init(_params()), jit,
                                         mask=mask)
  real_updates, _ = _update(tx, real, tx.init(_params()), jit)

  expected_sum, _ = clipping.clip_and_sum(real, 0.5)
  for got, want, total in zip(jax.tree.leaves(padded_updates),
                              jax.tree.leaves(real_updates),
                              jax.tree.leaves(expected_sum)):
    # Same values up to float summation order (different shapes under jit).
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got, np.asarray(total) / 10, rtol=1e-6)
  assert padded_state[0].clip_stats.num_examples == 4


def test_noise_std_is_z_c_over_expected_batch_size_ks():
  clip, noise_multiplier, expected_batch_size = 2.0, 1.5, 8.0
  std = noise_multiplier * clip / expected_batch_size
  tx = _dp_sgd(clip, noise_multiplier, jax.random.key(42), expected_batch_size)
  zeros = {'w': jnp.zeros((4, 3000)), 'b': jnp.zeros((4, 2000))}
  params = jax.tree.map(lambda x: x[0], zeros)
  updates, _ = jax.jit(tx.update)(transforms.PerExampleGrads(zeros), tx.init(params), params)
  samples = np.concatenate([np.ravel(x) for x in jax.tree.leaves(updates)])

  assert scipy.stats.kstest(samples, 'norm', args=(0, std)).pvalue > 1e-3
  for wrong_std in (std * 2 / 3, std * 3 / 2):
    wrong = scipy.stats.kstest(samples, 'norm', args=(0, wrong_std))
    assert wrong.pvalue < 1e-6
  # The two leaves get independent noise.
  assert abs(np.corrcoef(updates['w'][:2000], updates['b'])[0, 1]) < 0.1


def test_noise_is_fresh_per_step_and_reproducible_from_key_and_count():
  key = jax.random.key(7)
  grads = transforms.PerExampleGrads(jax.tree.map(jnp.zeros_like, _per_example_grads(3)))
  tx = _dp_sgd(1.0, 1.0, key, 5)
  update = jax.jit(tx.update)
  state0 = tx.init(_params())
  first, state1 = update(grads, state0, _params())
  second, _ = update(grads, state1, _params())
  again, _ = update(grads, tx.init(_params()), _params())

  assert not np.allclose(first['w'], second['w'])
  jax.tree.map(np.testing.assert_array_equal, first, again)
  other_key_tx = _dp_sgd(1.0, 1.0, jax.random.key(8), 5)
  other, _ = other_key_tx.update(grads, other_key_tx.init(_params()), _params())
  assert not np.allclose(first['w'], other['w'])
  # The key lives in the state: a restored state continues its own stream, and an int seed
  # is the same as jax.random.key(seed).
  resumed, _ = other_key_tx.update(grads, state1, _params())
  jax.tree.map(np.testing.assert_array_equal, second, resumed)
  seeded_tx = _dp_sgd(1.0, 1.0, 7, 5)
  seeded, _ = seeded_tx.update(grads, seeded_tx.init(_params()), _params())
  jax.tree.map(np.testing.assert_array_equal, first, seeded)


def test_dp_sgd_equals_clip_and_sum_then_gaussian_noise():
  grads = _per_example_grads(4)
  mask = np.array([True, True, False, True, True])
  key = jax.random.key(3)
  full = _dp_sgd(0.8, 1.3, key, 4)
  noise_only = transforms.gaussian_noise(0.8, noise_multiplier=1.3, key=key,
                                         expected_batch_size=4)

  full_state, noise_state = full.init(_params()), noise_only.init(_params())
  for _ in range(2):  # also at count 1, to check both use fold_in(key, count)
    full_updates, full_state = full.update(transforms.PerExampleGrads(grads, mask), full_state,
                                           _params())
    clipped_sum, _ = clipping.clip_and_sum(grads, 0.8, mask)
    noise_updates, noise_state = noise_only.update(clipped_sum, noise_state)
    for got, want in zip(jax.tree.leaves(full_updates),
                         jax.tree.leaves(noise_updates)):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_gaussian_noise_without_noise_divides_sum_by_expected_size():
  summed = {'w': jnp.array([3.0, -6.0])}
  tx = transforms.gaussian_noise(1.0, noise_multiplier=0.0, key=jax.random.key(0),
                                 expected_batch_size=3)
  updates, state = tx.update(summed, tx.init(summed))
  np.testing.assert_allclose(updates['w'], [1.0, -2.0])
  assert int(state.count) == 1


def test_jit_and_no_jit_agree_with_noise():
  grads = _per_example_grads(5)
  mask = np.array([True, True, True, False, True])
  tx = optax.chain(
      _dp_sgd(1.0, 0.7, jax.random.key(11), 4),
      optax.sgd(0.5))
  eager_state = jit_state = tx.init(_params())
  for _ in range(3):
    eager, eager_state = _update(tx, grads, eager_state, False, mask)
    jitted, jit_state = _update(tx, grads, jit_state, True, mask)
    for got, want in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_jitted_train_step_traces_once_across_poisson_batches():
  num_examples, dim = 64, 3
  features = np.random.default_rng(0).normal(size=(num_examples, dim))
  targets = features @ np.array([1.0, -2.0, 0.5])
  sampler = sampling.PoissonSampler(jax.random.key(1), num_examples, 0.25,
                                    multiple_of=8)
  tx = optax.chain(
      _dp_sgd(1.0, 1.0, jax.random.key(2), sampler.expected_batch_size),
      optax.sgd(0.1))
  params = {'w': jnp.zeros(dim)}
  opt_state = tx.init(params)
  num_traces = 0

  def loss(params, x, y):
    return 0.5 * (x @ params['w'] - y)**2

  @jax.jit
  def train_step(params, opt_state, x, y, mask):
    nonlocal num_traces
    num_traces += 1
    per_example_grads = jax.vmap(jax.grad(loss), (None, 0, 0))(params, x, y)
    updates, opt_state = tx.update(transforms.PerExampleGrads(per_example_grads, mask),
                                   opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  batch_sizes = set()
  for step in range(6):
    indices, mask = sampler.sample(step)
    batch_sizes.add(int(mask.sum()))
    rows = np.where(mask, indices, 0)  # Padding rows hold an out-of-range index.
    params, opt_state = train_step(params, opt_state, features[rows], targets[rows], mask)
  assert len(batch_sizes) > 1  # realised sizes vary, the shape does not
  assert num_traces == 1
  assert int(opt_state[0].count) == 6


def test_rejects_bad_hyperparameters():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match='l2_norm_clip'):
    _dp_sgd(0.0, 1.0, key, 4)
  with pytest.raises(ValueError, match='noise_multiplier'):
    transforms.gaussian_noise(1.0, noise_multiplier=-1.0, key=key, expected_batch_size=4)
  with pytest.raises(ValueError, match='expected_batch_size'):
    _dp_sgd(1.0, 1.0, key, 0)


def test_privacy_arguments_are_keyword_only():
  with pytest.raises(TypeError):
    transforms.dp_sgd(1.0, 1.1, jax.random.key(0), 4)  # pylint: disable=too-many-function-args
  with pytest.raises(TypeError):
    transforms.gaussian_noise(1.0, 1.1, jax.random.key(0), 4)  # pylint: disable=too-many-function-args


def test_clip_statistics_are_opt_in():
  # Checkpoints of the optimizer state hold no statistics of private data by default.
  tx = _dp_sgd(1.0, 0.0, jax.random.key(0), 5)
  _, state = _update(tx, _per_example_grads(0), tx.init(_params()), jit=False)
  assert state.clip_stats is None
  assert all(leaf.size <= 2 for leaf in jax.tree.leaves(jax.random.key_data(state.key)))


MISUSES = {
    # Weight decay first broadcasts the params into every example's gradient.
    'decay_first': lambda tx: optax.chain(optax.add_decayed_weights(1e-3), tx),
    # A scale before dp_sgd changes the gradients (and the mask's dtype).
    'scale_first': lambda tx: optax.chain(optax.scale(0.5), tx),
}


@pytest.mark.parametrize('misuse', sorted(MISUSES))
def test_transformations_before_dp_sgd_fail_loudly(misuse):
  tx = MISUSES[misuse](_dp_sgd(1.0, 0.0, jax.random.key(0), 5))
  grads = transforms.PerExampleGrads(_per_example_grads(0), jnp.ones(5, bool))
  with pytest.raises((ValueError, TypeError)):
    jax.jit(tx.update)(grads, tx.init(_params()), _params())


def test_wrong_inputs_are_refused_at_trace_time_saying_what_was_passed():
  tx = _dp_sgd(1.0, 0.0, jax.random.key(0), 5)
  state, grads = tx.init(_params()), _per_example_grads(0)
  # Raw arrays (which a transformation before dp_sgd could have changed unnoticed).
  with pytest.raises(ValueError, match='PerExampleGrads'):
    jax.jit(tx.update)(grads, state, _params())
  # chain(add_decayed_weights, dp_sgd) with raw per-example arrays: refused.
  chained = optax.chain(optax.add_decayed_weights(1e-3), tx)
  with pytest.raises(ValueError, match='add_decayed_weights'):
    chained.update(grads, chained.init(_params()), _params())
  # A mean gradient: shape (3,) for a parameter of shape (3,).
  mean = transforms.PerExampleGrads(jax.tree.map(lambda x: x.mean(0), grads))
  with pytest.raises(ValueError, match=r"got shape \(2, 2\) for parameter \['b'\]\['c'\] of shape \(2, 2\)"):
    jax.jit(tx.update)(mean, state, _params())
  # No params to check against; a mask passed beside instead of inside; a float mask.
  with pytest.raises(ValueError, match='needs the params'):
    tx.update(transforms.PerExampleGrads(grads), state)
  with pytest.raises(ValueError, match='inside PerExampleGrads'):
    tx.update(transforms.PerExampleGrads(grads), state, _params(), mask=jnp.ones(5, bool))
  with pytest.raises(ValueError, match='must be bool'):
    tx.update(transforms.PerExampleGrads(grads, jnp.ones(5)), state, _params())
  with pytest.raises(ValueError, match='mask of shape'):
    tx.update(transforms.PerExampleGrads(grads, jnp.ones(4, bool)), state, _params())


# Reliability: every scalar type a caller may pass is checked, so no NaN or negative value
# can turn the noise off (np.float32('nan') > 0 is False, and jnp.where then gave std 0).
_SCALAR_TYPES = [float, np.float32, np.float64, lambda v: jnp.asarray(v, jnp.float32),
                 lambda v: jnp.asarray([v], jnp.float32), lambda v: np.asarray([[v]])]


@pytest.mark.parametrize('as_type', _SCALAR_TYPES)
def test_noise_std_is_z_c_over_e_for_every_scalar_type(as_type):
  z, clip, expected = 1.5, 2.0, 4
  params = {'w': jnp.zeros(40_000)}
  tx = transforms.dp_sgd(as_type(clip), noise_multiplier=as_type(z), key=jax.random.key(3),
                         expected_batch_size=as_type(expected))
  grads = transforms.PerExampleGrads({'w': jnp.zeros((2, 40_000))})
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_allclose(np.std(updates['w']), z * clip / expected, rtol=0.02)


_BAD_NOISE = [np.float32('nan'), jnp.nan, np.float32(-1), jnp.array(-1.0), float('inf'),
              jnp.array([jnp.inf]), np.array([-0.5]), True]


@pytest.mark.parametrize('noise_multiplier', _BAD_NOISE, ids=repr)
@pytest.mark.parametrize('factory', ['dp_sgd', 'gaussian_noise'])
def test_nan_negative_or_infinite_noise_multiplier_is_refused(noise_multiplier, factory):
  with pytest.raises(ValueError, match='noise_multiplier'):
    getattr(transforms, factory)(1.0, noise_multiplier=noise_multiplier, key=jax.random.key(0),
                                 expected_batch_size=4)


@pytest.mark.parametrize('clip', [jnp.array(-1.0), np.float32('nan'), np.int64(0), 0.0, False],
                         ids=repr)
def test_bad_clip_norm_is_refused(clip):
  with pytest.raises(ValueError, match='l2_norm_clip'):
    _dp_sgd(clip, 1.0, jax.random.key(0), 4)


@pytest.mark.parametrize('expected', [np.int64(0), np.float32('nan'), jnp.inf, -3, np.ones(2)],
                         ids=repr)
def test_bad_expected_batch_size_is_refused(expected):
  with pytest.raises(ValueError, match='expected_batch_size'):
    _dp_sgd(1.0, 1.0, jax.random.key(0), expected)


def test_infinite_clip_with_noise_is_refused_and_allowed_without():
  with pytest.raises(ValueError, match='infinite'):
    _dp_sgd(jnp.inf, 1.0, jax.random.key(0), 4)
  _dp_sgd(jnp.inf, 0.0, jax.random.key(0), 4)  # The no-noise reference stays possible.


@pytest.mark.parametrize('key', [True, np.bool_(False), jnp.array([1.0, 2.0])], ids=repr)
def test_bool_and_float_keys_are_refused(key):
  with pytest.raises(ValueError, match='key'):
    _dp_sgd(1.0, 1.0, key, 4)


def test_traced_noise_multiplier_is_refused_with_a_clear_error():
  def build(z):
    return _dp_sgd(1.0, z, jax.random.key(0), 4).init({'w': jnp.zeros(2)}).count

  with pytest.raises(ValueError, match='traced'):
    jax.jit(build)(1.0)


def test_integer_gradients_are_refused():
  tx = _dp_sgd(1.0, 1.0, jax.random.key(0), 2)
  params = {'w': jnp.zeros(2, jnp.int32)}
  with pytest.raises(ValueError, match='floating'):
    tx.update(transforms.PerExampleGrads({'w': jnp.ones((2, 2), jnp.int32)}), tx.init(params),
              params)


@pytest.mark.parametrize('poison', [np.nan, np.inf, -np.inf, 1e30], ids=repr)
@pytest.mark.parametrize('z', [0.0, 1.0])
def test_a_nonfinite_example_contributes_zero_and_the_update_stays_finite(poison, z):
  """One bad example (NaN, inf, or a float32 norm overflow) is zeroed before clipping: the
  update equals the one without it (same noise), so the sensitivity stays C."""
  grads = _per_example_grads(7)
  bad = jax.tree.map(lambda g: np.array(g), grads)
  bad['w'][2, 1] = poison
  if poison == 1e30:
    bad['w'][2] = 1e30
  tx = _dp_sgd(1.0, z, jax.random.key(5), 5, return_clip_stats=True)
  state = tx.init(_params())
  got, got_state = _update(tx, bad, state, jit=True)
  without = jax.tree.map(lambda g: np.delete(g, 2, axis=0), grads)
  want, _ = _update(tx, without, state, jit=True)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert float(got_state.clip_stats.num_nonfinite) == 1
  assert float(got_state.clip_stats.num_examples) == 5
