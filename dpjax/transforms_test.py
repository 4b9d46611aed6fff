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


def _update(tx, grads, state, jit, **extra_args):
  update = jax.jit(tx.update) if jit else tx.update
  return update(grads, state, _params(), **extra_args)


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
  tx = transforms.dp_sgd(clip, 0.0, jax.random.key(0), expected_batch_size=5)

  updates, state = _update(tx, grads, tx.init(_params()), jit)

  np.testing.assert_allclose(
      updates['w'], np.mean(grads['w'] * factors[:, None], 0), rtol=1e-5)
  np.testing.assert_allclose(
      updates['b']['c'], np.mean(grads['b']['c'] * factors[:, None, None], 0),
      rtol=1e-5)
  # Clip statistics land in the state for logging.
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
      transforms.dp_sgd(0.5, 0.0, jax.random.key(0), expected_batch_size=10),
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
  tx = transforms.dp_sgd(clip, noise_multiplier, jax.random.key(42),
                         expected_batch_size)
  zeros = {'w': jnp.zeros((4, 3000)), 'b': jnp.zeros((4, 2000))}
  params = jax.tree.map(lambda x: x[0], zeros)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  samples = np.concatenate([np.ravel(x) for x in jax.tree.leaves(updates)])

  assert scipy.stats.kstest(samples, 'norm', args=(0, std)).pvalue > 1e-3
  for wrong_std in (std * 2 / 3, std * 3 / 2):
    wrong = scipy.stats.kstest(samples, 'norm', args=(0, wrong_std))
    assert wrong.pvalue < 1e-6
  # The two leaves get independent noise.
  assert abs(np.corrcoef(updates['w'][:2000], updates['b'])[0, 1]) < 0.1


def test_noise_is_fresh_per_step_and_reproducible_from_key_and_count():
  key = jax.random.key(7)
  grads = jax.tree.map(jnp.zeros_like, _per_example_grads(3))
  tx = transforms.dp_sgd(1.0, 1.0, key, expected_batch_size=5)
  update = jax.jit(tx.update)
  state0 = tx.init(_params())
  first, state1 = update(grads, state0, _params())
  second, _ = update(grads, state1, _params())
  again, _ = update(grads, tx.init(_params()), _params())

  assert not np.allclose(first['w'], second['w'])
  jax.tree.map(np.testing.assert_array_equal, first, again)
  other_key_tx = transforms.dp_sgd(1.0, 1.0, jax.random.key(8), 5)
  other, _ = other_key_tx.update(grads, other_key_tx.init(_params()), _params())
  assert not np.allclose(first['w'], other['w'])
  # The key lives in the state: a restored state continues its own stream, and an int seed
  # is the same as jax.random.key(seed).
  resumed, _ = other_key_tx.update(grads, state1, _params())
  jax.tree.map(np.testing.assert_array_equal, second, resumed)
  seeded_tx = transforms.dp_sgd(1.0, 1.0, 7, 5)
  seeded, _ = seeded_tx.update(grads, seeded_tx.init(_params()), _params())
  jax.tree.map(np.testing.assert_array_equal, first, seeded)


def test_dp_sgd_equals_clip_and_sum_then_gaussian_noise():
  grads = _per_example_grads(4)
  mask = np.array([True, True, False, True, True])
  key = jax.random.key(3)
  full = transforms.dp_sgd(0.8, 1.3, key, expected_batch_size=4)
  noise_only = transforms.gaussian_noise(0.8, 1.3, key, expected_batch_size=4)

  full_state, noise_state = full.init(_params()), noise_only.init(_params())
  for _ in range(2):  # also at count 1, to check both use fold_in(key, count)
    full_updates, full_state = full.update(grads, full_state, mask=mask)
    clipped_sum, _ = clipping.clip_and_sum(grads, 0.8, mask)
    noise_updates, noise_state = noise_only.update(clipped_sum, noise_state)
    for got, want in zip(jax.tree.leaves(full_updates),
                         jax.tree.leaves(noise_updates)):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_gaussian_noise_without_noise_divides_sum_by_expected_size():
  summed = {'w': jnp.array([3.0, -6.0])}
  tx = transforms.gaussian_noise(1.0, 0.0, jax.random.key(0), 3)
  updates, state = tx.update(summed, tx.init(summed))
  np.testing.assert_allclose(updates['w'], [1.0, -2.0])
  assert int(state.count) == 1


def test_jit_and_no_jit_agree_with_noise():
  grads = _per_example_grads(5)
  mask = np.array([True, True, True, False, True])
  tx = optax.chain(
      transforms.dp_sgd(1.0, 0.7, jax.random.key(11), expected_batch_size=4),
      optax.sgd(0.5))
  eager_state = jit_state = tx.init(_params())
  for _ in range(3):
    eager, eager_state = tx.update(grads, eager_state, _params(), mask=mask)
    jitted, jit_state = jax.jit(tx.update)(grads, jit_state, _params(),
                                           mask=mask)
    for got, want in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_jitted_train_step_traces_once_across_poisson_batches():
  num_examples, dim = 64, 3
  features = np.random.default_rng(0).normal(size=(num_examples, dim))
  targets = features @ np.array([1.0, -2.0, 0.5])
  sampler = sampling.PoissonSampler(jax.random.key(1), num_examples, 0.25,
                                    multiple_of=8)
  tx = optax.chain(
      transforms.dp_sgd(1.0, 1.0, jax.random.key(2),
                        sampler.expected_batch_size),
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
    updates, opt_state = tx.update(per_example_grads, opt_state, params,
                                   mask=mask)
    return optax.apply_updates(params, updates), opt_state

  batch_sizes = set()
  for step in range(6):
    indices, mask = sampler.sample(step)
    batch_sizes.add(int(mask.sum()))
    params, opt_state = train_step(params, opt_state, features[indices],
                                   targets[indices], mask)
  assert len(batch_sizes) > 1  # realised sizes vary, the shape does not
  assert num_traces == 1
  assert int(opt_state[0].count) == 6


def test_rejects_bad_hyperparameters():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match='l2_norm_clip'):
    transforms.dp_sgd(0.0, 1.0, key, 4)
  with pytest.raises(ValueError, match='noise_multiplier'):
    transforms.gaussian_noise(1.0, -1.0, key, 4)
  with pytest.raises(ValueError, match='expected_batch_size'):
    transforms.dp_sgd(1.0, 1.0, key, 0)
