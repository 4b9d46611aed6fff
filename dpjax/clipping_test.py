"""Closed-form tests of per-example clipping (tiny pytrees, a linear model)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import clipping


def _per_example_grads(seed, batch_size=6):
  rng = np.random.default_rng(seed)  # test data only, nothing private
  row_scale = np.geomspace(0.05, 2.0, batch_size)  # norms on both sides of C
  return {
      'a': (rng.normal(size=(batch_size, 3))
            * row_scale[:, None]).astype(np.float32),
      'b': {'c': (rng.normal(size=(batch_size, 2, 2))
                  * row_scale[:, None, None]).astype(np.float32)},
  }


def _numpy_norms(grads):
  return np.sqrt(np.sum(grads['a']**2, axis=1)
                 + np.sum(grads['b']['c']**2, axis=(1, 2)))


def _global_norm(tree):
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                           for x in jax.tree.leaves(tree))))


def _tree_sub(x, y):
  return jax.tree.map(lambda u, v: np.asarray(u, np.float64) - v, x, y)


def test_clip_and_sum_matches_closed_form():
  grads = _per_example_grads(0)
  clip = 1.5
  norms = _numpy_norms(grads)
  assert 0 < np.sum(norms > clip) < len(norms)  # both regimes occur
  factors = np.minimum(1.0, clip / norms)

  clipped_sum, stats = clipping.clip_and_sum(grads, clip)

  np.testing.assert_allclose(
      clipped_sum['a'], np.sum(grads['a'] * factors[:, None], 0), rtol=1e-5)
  np.testing.assert_allclose(
      clipped_sum['b']['c'],
      np.sum(grads['b']['c'] * factors[:, None, None], 0), rtol=1e-5)
  assert stats.num_examples == 6
  assert stats.num_clipped == np.sum(norms > clip)
  np.testing.assert_allclose(stats.sum_norms, norms.sum(), rtol=1e-5)
  np.testing.assert_allclose(stats.fraction_clipped, np.mean(norms > clip))
  np.testing.assert_allclose(stats.mean_norm, norms.mean(), rtol=1e-5)


def test_infinite_clip_is_plain_sum_and_zero_gradient_is_fine():
  grads = _per_example_grads(1)
  grads['a'][0] = 0.0
  grads['b']['c'][0] = 0.0  # zero norm must not produce NaN
  clipped_sum, stats = clipping.clip_and_sum(grads, jnp.inf)
  np.testing.assert_allclose(clipped_sum['a'], grads['a'].sum(0), rtol=1e-5)
  np.testing.assert_allclose(
      clipped_sum['b']['c'], grads['b']['c'].sum(0), rtol=1e-5)
  assert stats.num_clipped == 0


@pytest.mark.parametrize('padding_value', [np.nan, np.inf, 1e30])
def test_masked_rows_contribute_exactly_nothing(padding_value):
  grads = _per_example_grads(2)
  mask = np.array([True, True, False, True, False, True])
  real = jax.tree.map(lambda x: x[mask], grads)
  poisoned = jax.tree.map(np.copy, grads)
  poisoned['a'][~mask] = padding_value
  poisoned['b']['c'][~mask] = padding_value

  clipped_sum, stats = clipping.clip_and_sum(poisoned, 1.0, mask)
  expected_sum, expected_stats = clipping.clip_and_sum(real, 1.0)

  # Equal up to float summation order; finite although padding is not.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6),
               clipped_sum, expected_sum)
  assert stats.num_examples == 4
  np.testing.assert_allclose(np.asarray(stats), np.asarray(expected_stats),
                             rtol=1e-6)


def test_all_padding_gives_zero_sum_and_zero_stats():
  grads = _per_example_grads(3)
  clipped_sum, stats = clipping.clip_and_sum(grads, 1.0, np.zeros(6, bool))
  assert _global_norm(clipped_sum) == 0.0
  assert stats.fraction_clipped == 0.0 and stats.mean_norm == 0.0


def test_sensitivity_to_one_example_is_bounded_by_clip_norm():
  clip = 0.7
  rng = np.random.default_rng(4)
  for trial in range(5):
    grads = _per_example_grads(10 + trial)
    base, _ = clipping.clip_and_sum(grads, clip)
    changed = jax.tree.map(np.copy, grads)
    j = rng.integers(6)
    scale = 10.0 ** rng.uniform(-3, 6)
    changed['a'][j] = rng.normal(size=3) * scale
    changed['b']['c'][j] = rng.normal(size=(2, 2)) * scale

    # Add/remove one example (mask it out): moves the sum by <= C.
    mask = np.arange(6) != j
    removed, _ = clipping.clip_and_sum(changed, clip, mask)
    assert _global_norm(_tree_sub(base, removed)) <= clip * (1 + 1e-5)
    # Replace one example arbitrarily: moves the sum by <= 2C.
    replaced, _ = clipping.clip_and_sum(changed, clip)
    assert _global_norm(_tree_sub(base, replaced)) <= 2 * clip * (1 + 1e-5)


def test_replace_bound_two_c_is_attained():
  grads = {'w': np.array([[100.0, 0.0], [0.1, 0.1]], np.float32)}
  flipped = {'w': np.array([[-100.0, 0.0], [0.1, 0.1]], np.float32)}
  a, _ = clipping.clip_and_sum(grads, 1.0)
  b, _ = clipping.clip_and_sum(flipped, 1.0)
  np.testing.assert_allclose(_global_norm(_tree_sub(a, b)), 2.0, rtol=1e-6)


def test_rejects_bad_inputs():
  grads = _per_example_grads(5)
  with pytest.raises(ValueError, match='mask.shape'):
    clipping.clip_and_sum(grads, 1.0, np.ones(5, bool))
  with pytest.raises(ValueError, match='l2_norm_clip=0'):
    clipping.clip_and_sum(grads, 0.0)
  with pytest.raises(ValueError, match='example axis 0'):
    clipping.clip_and_sum({'a': np.ones((6, 2)), 'b': np.ones((5, 2))}, 1.0)


# A tiny linear regression: loss = 0.5 * (x.w + b - y)^2 for ONE example, so
# the per-example gradient is (residual * x, residual) in closed form.
def _linear_loss(params, example):
  prediction = example['x'] @ params['w'] + params['b']
  residual = prediction - example['y']
  return 0.5 * residual**2, {'residual': residual}


def _linear_problem(batch_size=8, dim=3, seed=6):
  rng = np.random.default_rng(seed)
  params = {'w': rng.normal(size=dim).astype(np.float32),
            'b': np.float32(0.5)}
  batch = {'x': rng.normal(size=(batch_size, dim)).astype(np.float32) * 2,
           'y': rng.normal(size=batch_size).astype(np.float32)}
  return params, batch


def test_clipped_grad_sum_matches_closed_form_per_example_grads():
  params, batch = _linear_problem()
  mask = np.array([True] * 6 + [False] * 2)
  batch['x'][~mask] = np.nan  # padding rows may hold garbage
  residual = batch['x'] @ params['w'] + params['b'] - batch['y']
  explicit_grads = {'w': residual[:, None] * batch['x'], 'b': residual}

  grad_sum, stats, aux = clipping.clipped_grad_sum(
      _linear_loss, params, batch, mask, l2_norm_clip=1.0)
  expected_sum, expected_stats = clipping.clip_and_sum(
      explicit_grads, 1.0, mask)

  for key in ('w', 'b'):
    np.testing.assert_allclose(grad_sum[key], expected_sum[key], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(stats), np.asarray(expected_stats),
                             rtol=1e-5)
  np.testing.assert_allclose(aux['residual'][mask], residual[mask], rtol=1e-5)
  assert aux['residual'].shape == (8,)


def test_microbatched_equals_unchunked_under_jit():
  params, batch = _linear_problem(batch_size=12)
  mask = np.arange(12) % 5 != 3
  run = jax.jit(
      functools.partial(clipping.clipped_grad_sum, _linear_loss),
      static_argnames='microbatch_size')

  full = run(params, batch, mask, 0.8)
  chunked = run(params, batch, mask, 0.8, microbatch_size=4)

  for got, want in zip(jax.tree.leaves(chunked), jax.tree.leaves(full)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert chunked[2]['residual'].shape == (12,)


def test_microbatch_size_must_divide_batch():
  params, batch = _linear_problem(batch_size=10)
  with pytest.raises(ValueError, match='batch_size=10 to be a multiple of '
                     'microbatch_size=4'):
    clipping.clipped_grad_sum(_linear_loss, params, batch, None, 1.0,
                              microbatch_size=4)


def test_float64_gradients_keep_float64_norms():
  with jax.enable_x64(True):
    grads = {'w': jnp.array([[3.0, 4.0], [0.3, 0.4]], jnp.float64) * (1 + 1e-10)}
    clipped_sum, stats = clipping.clip_and_sum(grads, 5.0)
    assert stats.sum_norms.dtype == jnp.float64
    assert int(stats.num_clipped) == 1  # 5 (1 + 1e-10) > 5: lost in float32.
    # [3, 4] clipped to norm 5, plus [0.3, 0.4] (1 + 1e-10) unclipped.
    np.testing.assert_allclose(clipped_sum['w'], [3.3 + 3e-11, 4.4 + 4e-11], rtol=1e-13)


def test_integer_gradients_are_refused():
  with pytest.raises(ValueError, match='floating'):
    clipping.clip_and_sum({'w': jnp.ones((3, 2), jnp.int32)}, 1.0)


@pytest.mark.parametrize('clip', [np.float32('nan'), jnp.array(-1.0), np.int64(0)], ids=repr)
def test_concrete_bad_clip_norm_is_refused_for_every_scalar_type(clip):
  with pytest.raises(ValueError, match='l2_norm_clip'):
    clipping.clip_and_sum(_per_example_grads(0), clip)


def test_traced_bad_clip_norm_gives_nan_not_a_negative_clip():
  total = jax.jit(lambda clip: clipping.clip_and_sum(_per_example_grads(0), clip)[0])
  assert all(bool(jnp.all(jnp.isnan(x))) for x in jax.tree.leaves(total(-1.0)))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(total(1.0)))


def test_norm_overflow_and_nan_rows_are_zeroed_and_counted():
  grads = {'w': np.array([[3.0, 4.0], [np.nan, 0.0], [1e30, 1e30], [0.3, 0.4]], np.float32)}
  clipped_sum, stats = clipping.clip_and_sum(grads, 1.0)
  np.testing.assert_allclose(clipped_sum['w'], [0.9, 1.2], rtol=1e-6)
  assert (float(stats.num_examples), float(stats.num_nonfinite)) == (4, 2)
  assert float(stats.num_clipped) == 1
  np.testing.assert_allclose(float(stats.mean_norm), 2.75, rtol=1e-6)  # Over finite rows.
