"""Known-answer tests of the private feature statistics (closed forms, sensitivity, noise)."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from dpjax import accounting
from dpjax import feature_stats


def _key(i=0):
  return jax.random.key(i)  # Reproducible keys, for tests only: real runs use secret keys.


def _features(num=40, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  scale = np.array([0.5, 2.0, 10.0])[:channels]
  return rng.normal(1.5, 1.0, size=(num, 5, 4, channels)) * scale


def _stats(features, unit_ids=None, **kwargs):
  kwargs = {'l2_norm_clip': 1e6, 'noise_multiplier': 0.0, 'key': _key(), **kwargs}
  return feature_stats.private_feature_stats(features, unit_ids, **kwargs)


@pytest.mark.parametrize('public_count', [True, False])
def test_no_noise_and_no_clipping_give_the_exact_pooled_mean_and_variance(public_count):
  x = _features()
  stats = _stats(x, expected_num_units=len(x) if public_count else None)
  np.testing.assert_allclose(stats.mean, x.mean(axis=(0, 1, 2)), rtol=1e-12)
  np.testing.assert_allclose(stats.var, x.var(axis=(0, 1, 2)), rtol=1e-10)
  assert stats.num_units == pytest.approx(len(x), rel=1e-12)
  assert stats.mean.shape == stats.var.shape == (3,)
  assert stats.noisy_sum.shape == ((6,) if public_count else (7,))


def test_units_with_several_images_are_weighted_as_units():
  x = _features(num=10)
  units = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
  stats = _stats(x, units, expected_num_units=4)
  # Closed form: the mean over units of each unit's mean image statistic.
  per_image_mean = x.mean(axis=(1, 2))
  per_image_square = (x**2).mean(axis=(1, 2))
  unit_mean = np.stack([per_image_mean[units == u].mean(0) for u in range(4)])
  unit_square = np.stack([per_image_square[units == u].mean(0) for u in range(4)])
  mean = unit_mean.mean(0)
  np.testing.assert_allclose(stats.mean, mean, rtol=1e-12)
  np.testing.assert_allclose(stats.var, unit_square.mean(0) - mean**2, rtol=1e-10)
  # Same answer from batches that split units, with string ids and a padding mask.
  names = np.array([f'p{u}' for u in units])
  pad = np.zeros((2,) + x.shape[1:])
  batches = [(x[:2], names[:2]),
             (np.concatenate([x[2:5], pad]), np.append(names[2:5], ['pad', 'pad']),
              np.array([True] * 3 + [False] * 2)),
             (jnp.asarray(x[5:]), names[5:])]
  streamed = feature_stats.private_feature_stats(
      iter(batches), l2_norm_clip=1e6, noise_multiplier=0.0, key=_key(),
      expected_num_units=4)
  # (The JAX batch is float32: equal to float32 precision.)
  np.testing.assert_allclose(streamed.mean, stats.mean, rtol=1e-6)
  np.testing.assert_allclose(streamed.var, stats.var, rtol=1e-6)


def _one_unit(vector, images=1):
  """Constant feature maps [images, 5, 4, c]: the per-image vector is concat(x, x**2)."""
  return np.tile(np.asarray(vector, np.float64)[None, None, None, :], (images, 5, 4, 1))


@pytest.mark.parametrize('public_count', [True, False])
def test_adding_or_removing_one_unit_moves_the_sum_by_at_most_c(public_count):
  clip = 2.0
  base = _features(num=20, channels=2, seed=1) * 0.05  # Small units: none clipped.
  count = {'expected_num_units': 21} if public_count else {}
  without = _stats(base, l2_norm_clip=clip, **count)
  huge = _one_unit([1e6, -3e5], images=3)
  with_huge = _stats(np.concatenate([base, huge]), np.append(np.arange(20), [20] * 3),
                     l2_norm_clip=clip, **count)
  change = with_huge.noisy_sum - without.noisy_sum
  assert np.linalg.norm(change) == pytest.approx(clip, rel=1e-12)  # Exactly C.
  # Its direction is that of the unit's whole vector (clipped as one).
  vector = np.array([1e6, -3e5, 1e12, 9e10] + ([] if public_count else [0.5 * clip]))
  np.testing.assert_allclose(change, clip * vector / np.linalg.norm(vector), rtol=1e-9,
                             atol=1e-12)
  # A unit with non-finite features contributes nothing (norm 0 <= C), and no NaN leaks out.
  broken = _one_unit([np.nan, np.inf])
  with_broken = _stats(np.concatenate([base, broken]), l2_norm_clip=clip, **count)
  assert np.all(np.isfinite(with_broken.noisy_sum))
  np.testing.assert_allclose(with_broken.noisy_sum, without.noisy_sum, rtol=1e-12)


def test_a_unit_is_clipped_once_as_the_mean_of_its_images():
  clip = 1.0
  big = np.array([50.0, 0.0])  # Vector concat(x, x**2) = [50, 0, 2500, 0]: norm >> C.
  small = np.array([0.0, 0.3])  # [0, 0.3, 0, 0.09]: norm < C, never clipped alone.
  images = np.concatenate([_one_unit(big), _one_unit(small, images=2)])
  stats = _stats(images, np.zeros(3, int), l2_norm_clip=clip, expected_num_units=1)
  unit_mean = (np.array([50.0, 0, 2500, 0]) + 2 * np.array([0, 0.3, 0, 0.09])) / 3
  expected = clip * unit_mean / np.linalg.norm(unit_mean)
  np.testing.assert_allclose(stats.noisy_sum, expected, rtol=1e-12)
  # Not per image: clipping each image and summing would give norm > C.
  per_image_sum = (np.array([1.0, 0, 0, 0]) * clip
                   + 2 * np.array([0, 0.3, 0, 0.09]))
  assert np.linalg.norm(per_image_sum) > clip
  assert np.linalg.norm(stats.noisy_sum) == pytest.approx(clip, rel=1e-12)
  # As three units instead, the sum is larger than C: grouping is what bounds it.
  separate = _stats(images, np.arange(3), l2_norm_clip=clip, expected_num_units=3)
  assert np.linalg.norm(separate.noisy_sum) > 1.1 * clip


@pytest.mark.parametrize('public_count', [True, False])
def test_noise_is_gaussian_with_std_z_times_c(public_count):
  z, clip = 3.0, 0.7
  x = _features(num=30, channels=3, seed=2) * 0.01
  count = {'expected_num_units': 30} if public_count else {}
  exact = _stats(x, l2_norm_clip=clip, **count).noisy_sum
  noise = np.concatenate([
      _stats(x, l2_norm_clip=clip, noise_multiplier=z, key=_key(i), **count).noisy_sum
      - exact for i in range(300)])
  assert len(noise) >= 1800
  std = z * clip
  assert scipy.stats.kstest(noise, scipy.stats.norm(scale=std).cdf).pvalue > 1e-3
  for wrong in (2 / 3 * std, 3 / 2 * std):
    assert scipy.stats.kstest(noise, scipy.stats.norm(scale=wrong).cdf).pvalue < 1e-6
  # Different keys, different noise; the same key, the same release.
  first = _stats(x, l2_norm_clip=clip, noise_multiplier=z, key=_key(7), **count)
  again = _stats(x, l2_norm_clip=clip, noise_multiplier=z, key=_key(7), **count)
  np.testing.assert_array_equal(first.noisy_sum, again.noisy_sum)


def test_noisy_statistics_are_post_processing_of_the_noisy_sum():
  x = _features(num=50, channels=3, seed=3)
  stats = _stats(x, l2_norm_clip=200.0, noise_multiplier=2.0, key=_key(3), var_floor=1e-3)
  n = stats.noisy_sum[-1] / (0.5 * 200.0)
  assert stats.num_units == pytest.approx(max(n, 1.0), rel=1e-12)
  np.testing.assert_allclose(stats.mean, stats.noisy_sum[:3] / stats.num_units, rtol=1e-12)
  np.testing.assert_allclose(
      stats.var, np.maximum(stats.noisy_sum[3:6] / stats.num_units - stats.mean**2, 1e-3),
      rtol=1e-12)
  # Huge noise: the floor keeps the variance positive.
  noisy = _stats(x, l2_norm_clip=200.0, noise_multiplier=1e4, key=_key(4),
                 expected_num_units=50, var_floor=0.25)
  assert np.all(noisy.var >= 0.25)


def test_the_release_is_recorded_as_one_gaussian_mechanism():
  stats = _stats(_features(), l2_norm_clip=100.0, noise_multiplier=8.0, key=_key(1),
                 expected_num_units=40)
  assert stats.noise_multiplier == 8.0 and stats.l2_norm_clip == 100.0
  ledger = accounting.PrivacyLedger('poisson')
  ledger.record_gaussian(stats.noise_multiplier, 'feature_stats')
  assert ledger.dp_event() == dp_accounting.GaussianDpEvent(8.0)


@pytest.mark.parametrize('key', [0, 7, True, np.int64(3), np.uint32(3), jnp.int32(3),
                                 np.array([1, 2], np.int64), 'secret', None])
def test_refuses_seeds_and_other_non_keys(key):
  with pytest.raises(TypeError, match='key'):
    _stats(_features(num=3), key=key)


def test_accepts_typed_and_raw_keys_but_one_key_only():
  x = _features(num=3)
  raw = jax.random.key_data(_key(5))
  np.testing.assert_array_equal(_stats(x, noise_multiplier=1.0, key=raw).noisy_sum,
                                _stats(x, noise_multiplier=1.0, key=_key(5)).noisy_sum)
  with pytest.raises(ValueError, match='one key'):
    _stats(x, key=jax.random.split(_key(), 2))


def test_rejects_bad_arguments():
  x = _features(num=4)
  for bad in (0.0, -1.0, math.nan, math.inf, True):
    with pytest.raises(ValueError, match='l2_norm_clip'):
      _stats(x, l2_norm_clip=bad)
  for bad in (-1.0, math.nan, math.inf, True):
    with pytest.raises(ValueError, match='noise_multiplier'):
      _stats(x, noise_multiplier=bad)
  for bad in (0.0, -3.0, math.nan, math.inf, True):
    with pytest.raises(ValueError, match='expected_num_units'):
      _stats(x, expected_num_units=bad)
  for bad in (0.0, 1.0, math.nan):
    with pytest.raises(ValueError, match='count_weight'):
      _stats(x, count_weight=bad)
  with pytest.raises(ValueError, match='var_floor'):
    _stats(x, var_floor=-1.0)
  with pytest.raises(ValueError, match='unit_ids'):
    _stats(x, np.arange(3))
  with pytest.raises(ValueError, match='mask'):
    _stats(x, mask=np.ones(4, int))
  with pytest.raises(ValueError, match='shape'):
    _stats(np.ones(4))
  with pytest.raises(ValueError, match='channels'):
    feature_stats.private_feature_stats(
        [(x, np.arange(4)), (x[..., :2], np.arange(4))], l2_norm_clip=1.0,
        noise_multiplier=1.0, key=_key())
  with pytest.raises(ValueError, match='batch'):
    feature_stats.private_feature_stats([x], l2_norm_clip=1.0, noise_multiplier=1.0,
                                        key=_key())
  with pytest.raises(ValueError, match='at least one batch'):
    feature_stats.private_feature_stats([], l2_norm_clip=1.0, noise_multiplier=1.0,
                                        key=_key())


def test_noise_is_float64_and_snapped_so_the_float32_sampler_attack_fails():
  """Regression: with float32 jax.random.normal noise (2^23 values), (release - sum) / (zC)
  was exactly a float32 sampler value under the true hypothesis and not under the other, so
  membership was certain. Now the noise has 53-bit resolution and the release lies on a grid."""
  rng = np.random.default_rng(1)
  n, c, clip, z = 60, 9, 1.0, 8.0
  x = np.abs(rng.normal(0.05, 0.02, size=(n, 1, 1, c))).astype(np.float32)
  exact = lambda f: feature_stats.private_feature_stats(
      f, l2_norm_clip=clip, noise_multiplier=0.0, key=jax.random.key(0),
      expected_num_units=n).noisy_sum
  s_in, s_out = exact(x), exact(x[1:])
  consistent = {'in': 0, 'out': 0}
  for t in range(10):
    release = feature_stats.private_feature_stats(
        x, l2_norm_clip=clip, noise_multiplier=z, key=jax.random.key(100 + t),
        expected_num_units=n).noisy_sum
    grid = 2.0 ** np.floor(np.log2(z * clip * feature_stats.SNAP_FRACTION))
    np.testing.assert_array_equal(release, np.round(release / grid) * grid)
    for name, s in (('in', s_in), ('out', s_out)):
      noise = (release - s) / (z * clip)
      consistent[name] += bool(np.all(noise == noise.astype(np.float32).astype(np.float64)))
  assert consistent == {'in': 0, 'out': 0}


def test_unit_ids_must_be_consistent_across_batches():
  features = np.ones((2, 1, 1, 3), np.float32)
  with pytest.raises(ValueError, match='NaN'):
    feature_stats.private_feature_stats([(features, np.array([np.nan, 1.0]))], l2_norm_clip=1.0,
                                        noise_multiplier=0.0, key=jax.random.key(0),
                                        expected_num_units=2)
  with pytest.raises(ValueError, match='one kind'):
    feature_stats.private_feature_stats(
        [(features, np.array([7, 8])), (features, np.array(['7', '8']))], l2_norm_clip=1.0,
        noise_multiplier=0.0, key=jax.random.key(0), expected_num_units=2)
