"""Known-answer and statistical tests of the DP-SGD transformations."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from dpjax import clipping
from dpjax import transforms
from dpjax import sampling
from dpjax import secret_keys


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
  state = tx.init(_params())  # One state for both: a second init would warn (same noise).
  padded_updates, padded_state = _update(tx, grads, state, jit, mask=mask)
  real_updates, _ = _update(tx, real, state, jit)

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
  with pytest.warns(UserWarning, match='SAME noise'):  # A second init repeats the noise.
    again_state = tx.init(_params())
  again, _ = update(grads, again_state, _params())

  assert not np.allclose(first['w'], second['w'])
  jax.tree.map(np.testing.assert_array_equal, first, again)
  other_key_tx = _dp_sgd(1.0, 1.0, jax.random.key(8), 5)
  other, _ = other_key_tx.update(grads, other_key_tx.init(_params()), _params())
  assert not np.allclose(first['w'], other['w'])
  # The key lives in the state: a restored state continues its own stream, and an int seed
  # (accepted only with the testing flag) is the same as jax.random.key(seed).
  resumed, _ = other_key_tx.update(grads, state1, _params())
  jax.tree.map(np.testing.assert_array_equal, second, resumed)
  with pytest.raises(ValueError, match='integer seed'):
    _dp_sgd(1.0, 1.0, 7, 5)
  seeded_tx = _dp_sgd(1.0, 1.0, 7, 5, allow_int_key_for_testing=True)
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
  chained = optax.chain(optax.add_decayed_weights(1e-3),
                        _dp_sgd(1.0, 0.0, jax.random.key(0), 5))  # Its own init: no reuse.
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


# --- Misuse (issue 23, point 5): integer keys, one key for sampler and noise, re-init, a
# forgotten mask. --------------------------------------------------------------------------

@pytest.mark.parametrize('seed', [0, 7, np.int64(3), np.uint32(5), jnp.array(2)], ids=repr)
@pytest.mark.parametrize('factory', ['dp_sgd', 'gaussian_noise'])
def test_integer_keys_are_refused_unless_flagged_for_testing(seed, factory):
  make = lambda **kw: getattr(transforms, factory)(1.0, noise_multiplier=1.0, key=seed,
                                                   expected_batch_size=4, **kw)
  with pytest.raises(ValueError, match='integer seed'):
    make()
  # With the testing flag: the same as the typed key of that seed (still not secret).
  flagged = make(allow_int_key_for_testing=True).init({'w': jnp.zeros(2)})
  typed = getattr(transforms, factory)(1.0, noise_multiplier=1.0, key=jax.random.key(int(seed)),
                                       expected_batch_size=4).init({'w': jnp.zeros(2)})
  np.testing.assert_array_equal(jax.random.key_data(flagged.key), jax.random.key_data(typed.key))


def test_state_holds_the_noise_domain_key_so_a_restored_state_resumes_the_stream():
  key = jax.random.key(21)  # A test key: not secret.
  tx = _dp_sgd(1.0, 1.0, key, 5)
  state = tx.init(_params())
  np.testing.assert_array_equal(jax.random.key_data(state.key),
                                jax.random.key_data(secret_keys.noise_stream_key(key)))
  grads = transforms.PerExampleGrads(jax.tree.map(jnp.zeros_like, _per_example_grads(3)))
  _, state1 = tx.update(grads, state, _params())
  second, _ = tx.update(grads, state1, _params())
  # A restored state (raw key data through a checkpoint and back) continues the same stream.
  restored = state1._replace(key=jax.random.wrap_key_data(jax.random.key_data(state1.key)))
  again, _ = _dp_sgd(1.0, 1.0, jax.random.key(99), 5).update(grads, restored, _params())
  jax.tree.map(np.testing.assert_array_equal, second, again)


def test_one_key_for_sampler_and_noise_gives_noise_unrelated_to_the_inclusion_bits():
  num_examples, q = 4000, 0.5
  key = jax.random.key(123)  # A test key: not secret. The misuse: ONE key for both.
  # The old derivation, reproduced: noise of update t from fold_in(key, t), whose first leaf
  # is split(fold_in(key, t), n)[0] == fold_in(fold_in(key, t), 0) (partitionable threefry),
  # exactly the key of the sampler's inclusion bits at step t: correlation about -0.8 at
  # q = 0.5 (-0.59 in the review's setting). A monotone function of who was sampled.
  step_key = jax.random.fold_in(key, 0)
  old_noise = jax.random.normal(jax.random.split(step_key, 2)[0], (num_examples,))
  old_inclusion = sampling.exact_bernoulli(jax.random.fold_in(step_key, 0), q, (num_examples,))
  assert np.corrcoef(old_inclusion, old_noise)[0, 1] < -0.5

  sampler = sampling.PoissonSampler(key, num_examples, q)
  tx = _dp_sgd(1.0, 1.0, key, 1.0)
  params = {'a': jnp.zeros(num_examples), 'b': jnp.zeros(num_examples)}
  grads = transforms.PerExampleGrads(jax.tree.map(lambda p: jnp.zeros((1, *p.shape)), params))
  state = tx.init(params)
  for step in range(3):
    noise, state = tx.update(grads, state, params)
    inclusion = sampler.inclusion(step)
    for leaf in jax.tree.leaves(noise):  # std of a null correlation: 1/sqrt(4000) = 0.016
      assert abs(np.corrcoef(inclusion, leaf)[0, 1]) < 0.08


def test_a_second_init_warns_and_repeats_the_noise_a_new_key_does_not():
  """Documents the behaviour: the noise of update t is a function of (key, t) only."""
  grads = transforms.PerExampleGrads(jax.tree.map(jnp.zeros_like, _per_example_grads(3)))
  tx = _dp_sgd(1.0, 1.0, jax.random.key(31), 5)
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # Shapes only (traced): not counted, no warning.
    jax.eval_shape(tx.init, _params())
    first, _ = tx.update(grads, tx.init(_params()), _params())
  with pytest.warns(UserWarning, match='restarts the noise stream'):
    state = tx.init(_params())
  repeated, _ = tx.update(grads, state, _params())
  jax.tree.map(np.testing.assert_array_equal, first, repeated)  # Cancels in a difference.
  # Two transformations with one key add the same noise too (no warning can see that): one
  # secret key per run. A fresh key gives fresh noise.
  twin = _dp_sgd(1.0, 1.0, jax.random.key(31), 5)
  twin_noise, _ = twin.update(grads, twin.init(_params()), _params())
  jax.tree.map(np.testing.assert_array_equal, first, twin_noise)
  fresh = _dp_sgd(1.0, 1.0, secret_keys.fresh_secret_key(), 5)
  fresh_noise, _ = fresh.update(grads, fresh.init(_params()), _params())
  assert not np.allclose(first['w'], fresh_noise['w'])


def _linear_model_sum(batch_x, mask, num_rows):
  """dp_sgd's clipped sum (z = 0, E = 1) for loss -(w.x + b) at w = 0: gradient (-x, -1)."""
  params = {'w': jnp.zeros(3), 'b': jnp.zeros(())}
  tx = _dp_sgd(1.0, 0.0, jax.random.key(0), 1.0)
  grads = {'w': -jnp.asarray(batch_x), 'b': -jnp.ones(num_rows)}
  updates, _ = tx.update(transforms.PerExampleGrads(grads, mask), tx.init(params), params)
  return np.concatenate([np.ravel(updates['w']), np.ravel(updates['b'])])


@pytest.mark.parametrize('as_array', [np.asarray, jnp.asarray], ids=['numpy', 'jax'])
def test_forgotten_mask_with_the_safe_gather_counts_no_example_twice(as_array):
  """The review's 33*C finding: gathering a Poisson batch with np.where(mask, indices, 0)
  and forgetting the mask counted example 0 once per padding row. With PaddedBatch.gather
  a padding row is an all-zero input that depends on no example: replacing one example
  moves the unmasked clipped sum by at most 2C (C per side), as with the mask."""
  num_examples, clip = 256, 1.0
  rng = np.random.default_rng(0)  # Test data only.
  features = 10 * rng.normal(size=(num_examples, 3)).astype(np.float32)  # Norms >> C.

  def replaced(example):  # Replace-one neighbour: one example's features negated.
    neighbour = features.copy()
    neighbour[example] = -features[example]
    return neighbour

  sampler = sampling.PoissonSampler(jax.random.key(1), num_examples, 0.125)
  aliased_gap = 0.0
  for step in range(6):
    batch = sampler.batch(step)
    rows = len(batch.mask)
    assert (~batch.mask).sum() > 20  # Plenty of padding rows (about 33 at this capacity).
    for example in (0, batch.indices[0]):  # Example 0, and one this batch holds.
      safe = [_linear_model_sum(batch.gather(as_array(x)), None, rows)
              for x in (features, replaced(example))]
      gap = np.linalg.norm(safe[0] - safe[1])
      assert gap <= 2 * clip + 1e-5  # Its own row, counted once.
      if example in batch.indices[batch.mask]:
        assert gap > 1.9 * clip
    # The padding rows' part of the unmasked sum is the same for every data set.
    masked = _linear_model_sum(batch.gather(as_array(features)), batch.mask, rows)
    np.testing.assert_allclose(safe[0] - masked, np.r_[0, 0, 0, -(~batch.mask).sum() * clip],
                               atol=1e-4)
    # The once-documented pattern: example 0 in every padding row.
    alias = np.where(batch.mask, batch.indices, 0)
    aliased = [_linear_model_sum(x[alias], None, rows) for x in (features, replaced(0))]
    aliased_gap = max(aliased_gap, np.linalg.norm(aliased[0] - aliased[1]))
  assert aliased_gap > 20 * clip  # About 2C per aliased row: (1 + padding) * 2C.


def test_readme_pattern_carries_the_mask_from_the_batch_and_refuses_losing_it():
  num_examples = 64
  rng = np.random.default_rng(1)  # Test data only.
  features = rng.normal(size=(num_examples, 3)).astype(np.float32)
  targets = features @ np.array([1.0, -2.0, 0.5], np.float32)
  sampler = sampling.PoissonSampler(jax.random.key(2), num_examples, 0.25, multiple_of=8)
  tx = _dp_sgd(1.0, 0.0, jax.random.key(3), sampler.expected_batch_size)
  params = {'w': jnp.ones(3)}
  state = tx.init(params)

  def per_example_grads(params, x, y):
    return jax.vmap(jax.grad(lambda p, x, y: 0.5 * (x @ p['w'] - y)**2), (None, 0, 0))(
        params, x, y)

  @jax.jit
  def safe_step(params, x, y, batch):
    grads = per_example_grads(params, x, y)
    return tx.update(transforms.PerExampleGrads.from_batch(grads, batch), state, params)[0]

  @jax.jit
  def explicit_step(params, x, y, mask):
    grads = per_example_grads(params, x, y)
    return tx.update(transforms.PerExampleGrads(grads, mask), state, params)[0]

  batch = sampler.batch(0)
  x, y = batch.gather((features, targets))
  assert (~batch.mask).any()
  want = explicit_step(params, x, y, batch.mask)
  jax.tree.map(np.testing.assert_array_equal, safe_step(params, x, y, batch), want)
  # The batch in the mask slot is read as its mask.
  grads = per_example_grads(params, x, y)
  got, _ = tx.update(transforms.PerExampleGrads(grads, batch), state, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
  # Ways of losing the mask that dp_sgd can see are refused.
  with pytest.raises(ValueError, match='from_batch'):
    tx.update(transforms.PerExampleGrads(grads), state, params, batch=batch)
  with pytest.raises(ValueError, match='from_batch'):
    tx.update(transforms.PerExampleGrads(grads), state, params, mask=batch.mask)
  with pytest.raises(ValueError, match='PaddedBatch'):
    transforms.PerExampleGrads.from_batch(grads, batch.mask)


# Floating-point-safe noise (issue 23, point 8): float32 jax.random.normal stops at 5.42
# standard deviations (a 23-bit uniform), which a one-coordinate record turns into outputs
# impossible without it (9e-6 per step at z = 1.07). The noise comes from dpjax.noise instead.

def test_dp_sgd_noise_is_dpjax_noise_standard_normal():
  from dpjax import noise
  clip, noise_multiplier, expected_batch_size = 0.5, 1.3, 4.0
  grads = _per_example_grads(6)
  tx = _dp_sgd(clip, noise_multiplier, jax.random.key(12), expected_batch_size)
  state = tx.init(_params())
  for count in range(2):  # fold_in(key, count) per step.
    updates, next_state = jax.jit(tx.update)(transforms.PerExampleGrads(grads), state, _params())
    clipped_sum, _ = clipping.clip_and_sum(grads, clip)
    normals = optax.tree_utils.tree_random_like(
        jax.random.fold_in(state.key, count), clipped_sum, sampler=noise.standard_normal,
        dtype=jnp.float32)
    want = jax.tree.map(lambda s, n: (s + noise_multiplier * clip * n) / expected_batch_size,
                        clipped_sum, normals)
    for got, expected in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
      np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    state = next_state


def test_jitted_dp_sgd_noise_has_std_z_c_and_tails_beyond_the_float32_normal():
  """~10^8 draws through a jitted dp_sgd update with zC = 1 and E = 1: the noise is N(0, 1) in
  the body and its tails pass 5.42, where float32 jax.random.normal never goes (expected count
  of |N| > 5.42: 6.0)."""
  from dpjax import noise
  size, steps = 2**23, 12
  params = {'w': jnp.zeros((size,))}
  tx = _dp_sgd(1.0, 1.0, jax.random.key(13), 1.0)
  update = jax.jit(tx.update)
  grads = transforms.PerExampleGrads({'w': jnp.zeros((1, size))})
  state, beyond, largest = tx.init(params), 0, 0.0
  float32_bound = max(abs(b) for b in noise.JAX_FLOAT32_NORMAL_SUPPORT)  # 5.42
  for step in range(steps):
    updates, state = update(grads, state, params)
    values = np.asarray(updates['w'])
    if step == 0:
      assert abs(values.std() - 1.0) < 1e-3
      assert scipy.stats.kstest(values[:10**6], 'norm').pvalue > 1e-3
    beyond += int(np.sum(np.abs(values) > float32_bound))
    largest = max(largest, float(np.abs(values).max()))
  assert 1 <= beyond <= 20, beyond  # Poisson(6.0).
  assert float32_bound < largest <= noise.SUPPORT_BOUND


def test_a_legacy_prng_key_of_a_small_seed_is_refused_like_the_seed():
  """jax.random.PRNGKey(0) is the seed 0 as raw key data (review finding): as public as key=0."""
  for make in (transforms.dp_sgd, transforms.gaussian_noise):
    with pytest.raises(ValueError, match='PRNGKey\\(0\\)'):
      make(1.0, noise_multiplier=1.0, key=jax.random.PRNGKey(0), expected_batch_size=2)
    with pytest.raises(ValueError, match='PRNGKey\\(12345\\)'):
      make(1.0, noise_multiplier=1.0, key=jax.random.PRNGKey(12345), expected_batch_size=2)
    make(1.0, noise_multiplier=1.0, key=jax.random.PRNGKey(0), expected_batch_size=2,
         allow_int_key_for_testing=True)
    # Raw data of a secret key is accepted (the checkpoint path restores keys this way).
    make(1.0, noise_multiplier=1.0, expected_batch_size=2,
         key=jax.random.key_data(secret_keys.fresh_secret_key()))


def _docs_text():
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  return (Path(__file__).resolve().parents[1] / 'docs' / 'USING_DP_SGD.md').read_text()


@pytest.mark.parametrize('before', [optax.add_decayed_weights(1e-3), optax.adamw(1e-3)],
                         ids=['add_decayed_weights', 'adamw'])
def test_a_transformation_before_dp_sgd_fails_with_the_error_the_docs_quote(before):
  """Issue 25: the error arises inside optax, before dp_sgd runs; it names PerExampleGrads,
  and docs/USING_DP_SGD.md ("Common errors") quotes it with the fix, "chain dp_sgd first"."""
  tx = optax.chain(before, _dp_sgd(1.0, 0.0, jax.random.key(0), 2.0))
  params = {'w': jnp.zeros(2)}
  grads = transforms.PerExampleGrads({'w': jnp.ones((2, 2))}, jnp.array([True, False]))
  with pytest.raises(ValueError, match='PerExampleGrads') as error:
    tx.update(grads, tx.init(params), params)
  docs = _docs_text()
  section = docs[docs.index('## Common errors'):]
  for line in str(error.value).splitlines():
    assert line.strip() in section, line
  assert 'chain dp_sgd first' in section


def test_the_other_chain_errors_the_docs_quote():
  params = {'w': jnp.zeros(2)}
  grads = transforms.PerExampleGrads({'w': jnp.ones((2, 2))}, jnp.array([True, False]))
  section = _docs_text().split('## Common errors')[1]
  for before, error_type in ((optax.scale(-1.0), ValueError),
                             (optax.clip_by_global_norm(1.0), TypeError)):
    tx = optax.chain(before, _dp_sgd(1.0, 0.0, jax.random.key(0), 2.0))
    with pytest.raises(error_type) as error:
      tx.update(grads, tx.init(params), params)
    message = ' '.join(str(error.value).split()).split(' (Tip')[0].rstrip('.')
    assert message in ' '.join(section.split()), message


def _dense_loss_fns():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  model = nn.Dense(2)
  params = model.init(jax.random.key(0), jnp.zeros((1, 6)))
  x, y = jnp.ones((4, 2, 3)), jnp.zeros((4,), jnp.int32)

  def one_example(params, example):  # clipped_grad_sum's: ONE example, x [2, 3]
    xi, yi = example
    logits = model.apply(params, xi.reshape(-1))
    return optax.softmax_cross_entropy_with_integer_labels(logits, yi), logits

  def whole_batch(params, batch):  # ghost_clipped_grad_sum's: the batch, losses [B]
    xb, yb = batch
    logits = model.apply(params, xb.reshape(xb.shape[0], -1))
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb), logits

  def batch_mean(params, batch):
    losses, logits = whole_batch(params, batch)
    return jnp.mean(losses), logits

  return params, (x, y), one_example, whole_batch, batch_mean


def test_clipped_grad_sum_and_ghost_take_different_loss_fns_as_documented():
  """Issue 25: one-example loss for clipped_grad_sum, whole-batch [B] losses for ghost."""
  from dpjax import ghost_clipping  # pylint: disable=g-import-not-at-top
  params, batch, one_example, whole_batch, batch_mean = _dense_loss_fns()
  vmap_sum, vmap_stats, _ = clipping.clipped_grad_sum(one_example, params, batch, None, 0.5)
  ghost_sum, ghost_stats, _ = ghost_clipping.ghost_clipped_grad_sum(
      whole_batch, params, batch, None, 0.5)
  for a, b in zip(jax.tree.leaves(vmap_sum), jax.tree.leaves(ghost_sum)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert float(vmap_stats.num_clipped) == float(ghost_stats.num_clipped)
  # The swapped functions fail, with the errors docs/USING_DP_SGD.md ("Common errors") names.
  section = _docs_text().split('## Common errors')[1]
  with pytest.raises(ValueError, match="ghost_clipped_grad_sum's loss_fn takes the whole batch"):
    ghost_clipping.ghost_clipped_grad_sum(one_example, params, batch, None, 0.5)
  assert "ghost_clipped_grad_sum's loss_fn takes the whole batch" in section
  with pytest.raises(ValueError, match='loss_fn must return one loss per example') as error:
    ghost_clipping.ghost_clipped_grad_sum(batch_mean, params, batch, None, 0.5)
  assert str(error.value).replace('(4,)', '(B,)') in section
  for doc in (clipping.clipped_grad_sum.__doc__, ghost_clipping.ghost_clipped_grad_sum.__doc__):
    assert 'ONE example' in doc and 'WHOLE batch' in doc
