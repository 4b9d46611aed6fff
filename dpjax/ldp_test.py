"""Tests of dpjax.ldp: noise distribution (KS), once-per-example noise, epsilon reporting.

Most tests share one batch shape so the jitted mechanisms compile once; test-side arithmetic is
numpy (non-private test inputs come from a seeded numpy Generator, never the global RNG).
"""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dpjax import ldp

SHAPE = (8, 16, 16, 3)  # 6,144 noise values: the KS test separates beta from 1.5 beta easily.
IDS = np.arange(100, 108, dtype=np.int32)
KS_ACCEPT = 0.01  # A correct scale passes with probability 99%; the keys are fixed.
KS_REJECT = 1e-6
# Grey noise has one value per grey pixel: 8 * 32 * 32 = 8,192 values, so the KS test still
# separates beta from 1.5 beta (max CDF gap 0.074, ~6.7 / sqrt(n)).
GREY_SHAPE = (8, 32, 32, 3)


def _images(seed=0, low=0.0, high=1.0):
  return np.random.default_rng(seed).uniform(low, high, SHAPE).astype(np.float32)


def _grey_images(seed=0, low=0.0, high=1.0, shape=GREY_SHAPE):
  """Grey images stored as 3 equal channels, like the chest X-rays."""
  grey = np.random.default_rng(seed).uniform(low, high, shape[:-1] + (1,)).astype(np.float32)
  return np.repeat(grey, shape[-1], axis=-1)


def _levels(values):
  """[0, 1] values -> their 8-bit levels round(255 x), as the mechanism rounds them."""
  return np.round(np.clip(np.asarray(values, np.float32), 0, 1) * 255).astype(np.int64)


def _release_of(images, noise):
  """clip(level + 255 noise, 0, 255) / 255: the release for images and `laplace_noise` values."""
  noise_levels = np.round(np.asarray(noise, np.float64) * 255).astype(np.int64)
  return (np.clip(_levels(images) + noise_levels, 0, 255) / 255).astype(np.float32)


def _ks_pvalue(samples, scale):
  return stats.kstest(np.asarray(samples, np.float64).ravel(), 'laplace', args=(0.0, scale)).pvalue


@pytest.mark.parametrize('beta', [0.3, 2.0])
def test_laplace_noise_is_laplace_beta(beta):
  noise = ldp.laplace_noise(jax.random.key(0), SHAPE, beta, IDS)
  assert noise.shape == SHAPE and noise.dtype == jnp.float32
  assert _ks_pvalue(noise, beta) > KS_ACCEPT
  assert _ks_pvalue(noise, beta * 2 / 3) < KS_REJECT
  assert _ks_pvalue(noise, beta * 3 / 2) < KS_REJECT


def test_laplace_perturb_is_clipped_noise_on_images():
  """The released image is clip(image + laplace_noise) with the noise of the same key and ids,
  on the 8-bit grid: the image's levels round(255 x) plus the noise's (whole) levels."""
  key, images = jax.random.key(1), _images()
  noise = np.asarray(ldp.laplace_noise(key, SHAPE, 0.5, IDS))
  released = np.asarray(ldp.laplace_perturb(key, images, 0.5, IDS))
  assert released.dtype == np.float32
  levels = noise.astype(np.float64) * 255
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)  # Whole levels.
  np.testing.assert_allclose(released, _release_of(images, noise), atol=1e-6)
  # Within 1/510 (the rounding of the image) of clip(image + noise).
  np.testing.assert_allclose(released, np.clip(images + noise, 0.0, 1.0), atol=1 / 510 + 1e-6)


def test_clipping_keeps_values_in_unit_interval_with_closed_form_saturation():
  # For a pixel at 0.5, P(release == 1) = P(noise >= 0.5) = exp(-0.5 / beta) / 2, same for 0.
  beta = 2.0
  released = np.asarray(ldp.laplace_perturb(jax.random.key(3), np.full(SHAPE, 0.5, np.float32),
                                            beta, IDS))
  assert released.min() >= 0.0 and released.max() <= 1.0
  expected = 0.5 * math.exp(-0.5 / beta)
  tolerance = 5 * math.sqrt(expected * (1 - expected) / released.size)
  assert abs(np.mean(released == 1.0) - expected) < tolerance
  assert abs(np.mean(released == 0.0) - expected) < tolerance


def test_noise_is_the_same_every_epoch_and_depends_on_id_not_position():
  key, images = jax.random.key(4), _images(1)
  epoch_1 = np.asarray(ldp.laplace_perturb(key, images, 1.0, IDS))
  epoch_2 = np.asarray(ldp.laplace_perturb(key, images, 1.0, IDS))
  np.testing.assert_array_equal(epoch_1, epoch_2)

  order = np.array([4, 0, 5, 2, 1, 3, 7, 6])
  shuffled = ldp.laplace_perturb(key, images[order], 1.0, IDS[order])
  np.testing.assert_array_equal(shuffled, epoch_1[order])

  # Different ids get different noise; another key gives fresh noise.
  noise = np.asarray(ldp.laplace_noise(key, SHAPE, 1.0, IDS)).reshape(len(IDS), -1)
  assert np.all(np.abs(np.corrcoef(noise) - np.eye(len(IDS))) < 0.2)  # ~5 sd of 768 samples.
  other_key = np.asarray(ldp.laplace_perturb(jax.random.key(5), images, 1.0, IDS))
  assert np.mean(other_key == epoch_1) < 0.5  # Equal only where both saturate.


def test_mechanisms_under_jit_with_traced_beta_and_ids():
  key, images = jax.random.key(6), _images(2)
  for mechanism in (ldp.laplace_perturb, ldp.brightness_shift):
    np.testing.assert_allclose(jax.jit(mechanism)(key, images, jnp.float32(0.7), IDS),
                               mechanism(key, images, 0.7, IDS), atol=1e-6)


def test_raw_uint32_keys_give_the_same_noise():
  np.testing.assert_array_equal(ldp.laplace_noise(jax.random.key(8), SHAPE, 1.0, IDS),
                                ldp.laplace_noise(jax.random.PRNGKey(8), SHAPE, 1.0, IDS))


@pytest.mark.parametrize('beta', [0.3, 2.0])
def test_grey_noise_is_one_laplace_beta_per_grey_pixel(beta):
  noise = ldp.laplace_noise(jax.random.key(12), GREY_SHAPE, beta, IDS, grayscale=True)
  assert noise.shape == (8, 32, 32, 1) and noise.dtype == jnp.float32
  assert _ks_pvalue(noise, beta) > KS_ACCEPT
  assert _ks_pvalue(noise, beta * 2 / 3) < KS_REJECT
  assert _ks_pvalue(noise, beta * 3 / 2) < KS_REJECT


def test_grey_release_is_clipped_grey_noise_copied_to_all_channels():
  key, images, beta = jax.random.key(13), _grey_images(), 0.5
  released = np.asarray(ldp.laplace_perturb(key, images, beta, IDS, grayscale=True))
  assert released.shape == GREY_SHAPE and released.dtype == np.float32
  # The three channels are identical: one grey pixel is released once.
  np.testing.assert_array_equal(released[..., 0], released[..., 1])
  np.testing.assert_array_equal(released[..., 0], released[..., 2])
  noise = np.asarray(ldp.laplace_noise(key, GREY_SHAPE, beta, IDS, grayscale=True))
  expected = _release_of(images[..., :1], noise)
  np.testing.assert_allclose(released, np.broadcast_to(expected, GREY_SHAPE), atol=1e-6)
  assert 0.2 < np.mean((released > 0) & (released < 1)) < 0.9  # Noise shows, not all clipped.
  # A colour image with grayscale=True releases its channel mean (a grey version).
  colour = np.random.default_rng(5).uniform(size=GREY_SHAPE).astype(np.float32)
  from_colour = np.asarray(ldp.laplace_perturb(key, colour, beta, IDS, grayscale=True))
  np.testing.assert_allclose(
      from_colour, np.broadcast_to(_release_of(colour.mean(-1, keepdims=True), noise),
                                   GREY_SHAPE), atol=1e-6)


def test_grey_noise_is_the_same_every_call_and_differs_between_ids():
  key, images = jax.random.key(14), _grey_images(1)
  first = np.asarray(ldp.laplace_perturb(key, images, 1.0, IDS, grayscale=True))
  np.testing.assert_array_equal(first, ldp.laplace_perturb(key, images, 1.0, IDS, grayscale=True))
  order = np.array([4, 0, 5, 2, 1, 3, 7, 6])
  np.testing.assert_array_equal(
      ldp.laplace_perturb(key, images[order], 1.0, IDS[order], grayscale=True), first[order])
  noise = np.asarray(ldp.laplace_noise(key, GREY_SHAPE, 1.0, IDS, grayscale=True))
  noise = noise.reshape(len(IDS), -1)
  assert np.all(np.abs(np.corrcoef(noise) - np.eye(len(IDS))) < 0.2)  # ~6 sd of 1,024 samples.
  same_id = np.asarray(ldp.laplace_noise(key, GREY_SHAPE, 1.0, np.full(8, IDS[0]), grayscale=True))
  np.testing.assert_array_equal(same_id.reshape(len(IDS), -1), np.tile(noise[:1], (len(IDS), 1)))
  # Traced beta under jit gives the same release.
  grey_perturb = functools.partial(ldp.laplace_perturb, grayscale=True)
  np.testing.assert_allclose(jax.jit(grey_perturb)(key, images, jnp.float32(1.0), IDS), first,
                             atol=1e-6)


@pytest.mark.parametrize('grayscale, expected_ratio', [(True, 1.0), (False, 3.0)])
def test_averaging_channels_of_a_grey_release(grayscale, expected_ratio):
  """The attack that broke the old per-pixel claim. On a grey image, independent noise on the
  three channel copies (grayscale=False) is three releases of each grey pixel: averaging the
  channels divides the error variance by 3, so the pixel's real cost is 3/beta, not 1/beta.
  With grayscale=True the channels carry one draw and averaging gains nothing (ratio 1): this
  is why grey images must be noised once per grey pixel. beta is small so nothing is clipped."""
  beta, images = 0.02, np.full(GREY_SHAPE, 0.5, np.float32)
  released = np.asarray(ldp.laplace_perturb(jax.random.key(15), images, beta, IDS,
                                            grayscale=grayscale), np.float64)
  assert np.all((released > 0) & (released < 1))
  one_channel = np.var(released[..., 0] - 0.5)
  averaged = np.var(released.mean(axis=-1) - 0.5)
  assert one_channel == pytest.approx(2 * beta**2, rel=0.15)  # Laplace(0, beta) per channel.
  assert one_channel / averaged == pytest.approx(expected_ratio, rel=0.1)


def test_brightness_offsets_are_laplace_255_beta_on_the_255_scale():
  beta = 1.0
  offsets_255 = 255.0 * np.asarray(ldp.brightness_offsets(jax.random.key(9), beta, np.arange(2000)))
  assert _ks_pvalue(offsets_255, 255 * beta) > KS_ACCEPT
  assert _ks_pvalue(offsets_255, 255 * beta * 2 / 3) < KS_REJECT
  assert _ks_pvalue(offsets_255, 255 * beta * 3 / 2) < KS_REJECT


def test_brightness_shift_adds_one_value_per_image():
  key, images, beta = jax.random.key(10), _images(3, 0.3, 0.7), 0.2
  released = np.asarray(ldp.brightness_shift(key, images, beta, IDS))
  offsets = np.asarray(ldp.brightness_offsets(key, beta, IDS))
  expected = np.broadcast_to(offsets[:, None, None, None], SHAPE)
  np.testing.assert_allclose(released, _release_of(images, expected), atol=1e-6)
  unclipped = (released > 0.0) & (released < 1.0)
  assert unclipped.mean() > 0.5  # Enough pixels to check.
  quantized = _levels(images) / 255
  np.testing.assert_allclose((released - quantized)[unclipped], expected[unclipped], atol=1e-6)
  # Same every epoch, keyed on the id, not the position.
  order = np.arange(len(IDS))[::-1]
  np.testing.assert_array_equal(ldp.brightness_shift(key, images[order], beta, IDS[order]),
                                released[order])


def test_brightness_shift_leaves_pixel_differences_intact():
  # Why it gives no image-level DP: for an unclipped image, y_i - y_j = x_i - x_j exactly.
  # 8-bit images (as the trainer reads them), so that rounding to levels changes nothing;
  # beta = 0.02 (the smallest scale the exact mechanism takes is about 0.016) clips none.
  images = (_levels(_images(4, 0.45, 0.55)) / 255).astype(np.float32)
  released = np.asarray(ldp.brightness_shift(jax.random.key(11), images, 0.02, IDS))
  assert np.all((released > 0) & (released < 1))
  np.testing.assert_allclose(released - released.mean(axis=(1, 2, 3), keepdims=True),
                             images - images.mean(axis=(1, 2, 3), keepdims=True), atol=1e-5)


@pytest.mark.parametrize('bad_call, message', [
    (lambda: ldp.laplace_perturb(jax.random.key(0), np.zeros(SHAPE, np.float32), 0.0, IDS), 'beta'),
    (lambda: ldp.laplace_perturb(jax.random.key(0), np.zeros(SHAPE, np.float32), -1.0, IDS), 'beta'),
    (lambda: ldp.laplace_perturb(jax.random.key(0), np.zeros(SHAPE, np.float32), 1.0, IDS[:3]),
     'one example id'),
    (lambda: ldp.laplace_perturb(jax.random.key(0), np.zeros(SHAPE, np.uint8), 1.0, IDS), 'float'),
    (lambda: ldp.brightness_shift(jax.random.key(0), np.zeros(SHAPE, np.float32), 1.0,
                                  IDS.astype(np.float32)), 'integer'),
    (lambda: ldp.ldp_epsilon_report(1.0, (4, 4), variant='gaussian'), 'variant'),
    (lambda: ldp.ldp_epsilon_report(0.0, (4, 4)), 'beta'),
    (lambda: ldp.laplace_perturb(jax.random.key(0), np.zeros(SHAPE[:3], np.float32), 1.0, IDS,
                                 grayscale=True), 'channel axis'),
    (lambda: ldp.laplace_noise(jax.random.key(0), SHAPE[:2], 1.0, IDS, grayscale=True),
     'channel axis'),
    (lambda: ldp.ldp_epsilon_report(1.0, (4,), grayscale=True), 'channel axis'),
    (lambda: ldp.ldp_epsilon_report(1.0, (4, 4), grayscale=True), 'channel axis'),
])
def test_errors_name_the_problem(bad_call, message):
  with pytest.raises(ValueError, match=message):
    bad_call()


def test_perturbations_cover_the_variants():
  assert tuple(ldp.PERTURBATIONS) == ldp.VARIANTS
  assert ldp.PERTURBATIONS['laplace'] is ldp.laplace_perturb
  assert ldp.PERTURBATIONS['paper_brightness'] is ldp.brightness_shift


def test_epsilon_report_laplace_224():
  report = ldp.ldp_epsilon_report(1.0, (224, 224, 3), 'laplace')
  assert report['num_pixel_values'] == 150528
  assert report['per_pixel_epsilon'] == 1.0
  assert report['per_image_epsilon'] == 150528.0
  assert 'replace' in report['per_image_relation'] and 'pixel value' in report['per_pixel_relation']
  half = ldp.ldp_epsilon_report(2.0, (256, 256, 3))
  assert half['per_pixel_epsilon'] == 0.5 and half['per_image_epsilon'] == 256 * 256 * 3 / 2
  json.dumps(report)  # Goes into result files as is.
  line = ldp.format_ldp_epsilon(report)
  assert 'eps=1 per pixel value' in line and 'eps=150528 per 224x224x3 image' in line
  assert report['grayscale'] is False


def test_epsilon_report_grey_224_counts_each_grey_pixel_once():
  report = ldp.ldp_epsilon_report(1.0, (224, 224, 3), grayscale=True)
  assert report['grayscale'] is True
  assert report['num_pixel_values'] == 224 * 224 == 50176
  assert report['per_pixel_epsilon'] == 1.0
  assert report['per_image_epsilon'] == 50176.0
  assert 'grey pixel' in report['per_pixel_relation']
  assert report['per_image_relation'] == ldp.PER_IMAGE_RELATION
  assert '3/beta = 3 per pixel' in report['explanation']  # What independent copies would cost.
  half = ldp.ldp_epsilon_report(2.0, (256, 256, 3), 'laplace', grayscale=True)
  assert half['per_pixel_epsilon'] == 0.5 and half['per_image_epsilon'] == 256 * 256 / 2
  json.dumps(report)
  line = ldp.format_ldp_epsilon(report)
  assert 'eps=1 per pixel (one grey pixel changed)' in line
  assert 'eps=50176 per 224x224 grey image' in line and 'per pixel value' not in line
  assert '224x224x3' not in line  # One noise value per grey pixel, not per channel.
  # Reports stored before the field existed read as colour.
  colour = ldp.ldp_epsilon_report(1.0, (224, 224, 3))
  del colour['grayscale']
  assert 'eps=1 per pixel value' in ldp.format_ldp_epsilon(colour)
  # The paper variant has no image-level guarantee, grey or not.
  paper = ldp.ldp_epsilon_report(4.0, (224, 224, 3), 'paper_brightness', grayscale=True)
  assert paper['per_image_epsilon'] is None and paper['grayscale'] is True


def test_epsilon_report_paper_variant_has_no_image_level_guarantee():
  report = ldp.ldp_epsilon_report(4.0, (224, 224, 3), 'paper_brightness')
  assert report['per_image_epsilon'] is None and report['per_pixel_epsilon'] is None
  assert report['guarantee'] == 'no image-level guarantee'
  assert report['protected_statistic_epsilon'] == 0.25
  assert 'brightness' in report['protected_statistic']
  assert 'infinity' in report['explanation']
  json.dumps(report)
  line = ldp.format_ldp_epsilon(report)
  assert 'no image-level guarantee' in line and 'eps=0.25 for mean brightness only' in line


# Floating point (issue 23, point 8): float32 x + beta * jax.random.laplace was bounded at 16.6
# beta and rounded x + noise, so it was not 1/beta-DP. The release is now discrete and exact.

def _closed_form(beta):
  """P(release level j | input level q) [q, j] for the discrete Laplace at beta (1 + 2^-20)."""
  a = 1 / (255 * beta * (1 + 2.0**-20))
  rho = math.exp(-a)
  pmf = (1 - rho) / (1 + rho) * rho ** np.abs(np.arange(-255, 256))  # P(K = k), k = -255..255.
  levels = np.arange(256)
  table = np.empty((256, 256))
  for q in levels:
    table[q, 1:255] = pmf[levels[1:255] - q + 255]
    table[q, 0] = rho**q / (1 + rho)  # P(K <= -q).
    table[q, 255] = rho ** (255 - q) / (1 + rho)  # P(K >= 255 - q).
  np.testing.assert_allclose(table.sum(axis=1), 1.0, rtol=1e-12)
  return table


def _chi_square_pvalue(counts, probabilities, min_expected=5.0):
  """Chi-square goodness of fit, cells pooled (in order) until each expects >= min_expected."""
  expected = probabilities * counts.sum()
  pooled_counts, pooled_expected, count, mass = [], [], 0.0, 0.0
  for c, e in zip(counts, expected):
    count, mass = count + c, mass + e
    if mass >= min_expected:
      pooled_counts.append(count)
      pooled_expected.append(mass)
      count, mass = 0.0, 0.0
  pooled_counts[-1] += count
  pooled_expected[-1] += mass
  return stats.chisquare(pooled_counts, pooled_expected).pvalue


@pytest.mark.parametrize('beta', [0.125, 1.0])
def test_neighbouring_pixel_values_release_the_same_levels_with_bounded_ratio(beta):
  """Black (x = 0) and white (x = 1) pixels, the farthest neighbours: both releases are 8-bit
  levels, their frequencies match the closed form, which gives every level positive
  probability from both (same support) with a ratio <= exp(1/beta) on every level."""
  shape = (8, 96, 96, 3)
  images = np.zeros(shape, np.float32)
  images[4:] = 1.0
  released = np.asarray(ldp.laplace_perturb(jax.random.key(20), images, beta, IDS), np.float64)
  levels = np.round(released * 255)
  np.testing.assert_allclose(released * 255, levels, atol=1e-3)  # On the 8-bit grid.
  table = _closed_form(beta)
  for rows, q in ((slice(0, 4), 0), (slice(4, 8), 255)):
    counts = np.bincount(levels[rows].astype(np.int64).ravel(), minlength=256)
    assert _chi_square_pvalue(counts, table[q]) > 1e-3
  assert np.all(table > 0)  # Same support: every level, from every input level.
  log_ratios = np.log(table[:, None, :]) - np.log(table[None, :, :])
  assert log_ratios.max() <= 1 / beta
  assert log_ratios.max() == pytest.approx(1 / beta, rel=1e-5)  # Tight: q = 0 vs 255 at a tail.
  # The implemented (integer) probabilities: exact epsilon <= 1/beta, and about equal to it.
  assert 1 / beta * (1 - 1e-5) <= ldp.realized_pixel_epsilon(beta) <= 1 / beta


@pytest.mark.parametrize('beta', [0.02, 0.5, 1000.0])
def test_random_bits_map_to_levels_exactly_at_every_threshold(beta):
  """The search returns |K| = max{m : U < T_m} for the 95-bit U, and the top bit is the sign:
  checked at and around every threshold (where the 32-bit search keys tie) and at random U,
  so P(|K| >= m) = T_m / 2^95 exactly."""
  beta32 = ldp._float32_beta(beta)
  thresholds = ldp._mechanism(beta32)[1]
  table = jnp.asarray(ldp._table(beta32))
  values = [0, 1, 2**95 - 1] + [int(v) for v in np.random.default_rng(0).integers(
      0, 2**63, 2000, dtype=np.uint64)]
  values += [int(v) << 32 for v in values[3:]]  # Random values of all sizes up to 2^95.
  for t in thresholds[1:]:
    values += [t + d for d in (-(2**40), -(2**20), -1, 0, 1, 2**20, 2**40)]
  values = [min(max(v, 0), 2**95 - 1) for v in values]
  expected = [max(m for m, t in enumerate(thresholds) if v < t) for v in values]
  mask = 2**32 - 1
  words = np.array([[(v >> 64) & mask for v in values], [(v >> 32) & mask for v in values],
                    [v & mask for v in values]], np.uint32)
  np.testing.assert_array_equal(ldp._split_words(words, table), expected)
  words[0] |= np.uint32(2**31)  # Sign bit set: the same magnitudes, negated.
  np.testing.assert_array_equal(ldp._split_words(words, table), -np.array(expected))


@pytest.mark.parametrize('beta', [0.02, 0.125, 1.0, 4.0, 1e4])
def test_exact_epsilon_is_at_most_one_over_beta(beta):
  epsilon = ldp.realized_pixel_epsilon(beta)
  assert 1 / beta * (1 - 1e-5) <= epsilon <= 1 / beta
  report = ldp.ldp_epsilon_report(beta, (16, 16, 3))
  assert report['per_pixel_epsilon'] == 1 / beta
  assert f'{epsilon:.9g} <= 1/beta' in report['explanation']


@pytest.mark.parametrize('beta', [0.01, 0.015, 1e6, math.inf])
def test_betas_without_an_exact_guarantee_are_refused(beta):
  """Below about 0.016 the rarest levels would need probabilities under 2^-96 (float32 noise
  simply never produced them); such betas are refused, not reported with a false epsilon."""
  images = np.full(SHAPE, 0.5, np.float32)
  for call in (lambda: ldp.laplace_perturb(jax.random.key(0), images, beta, IDS),
               lambda: ldp.brightness_shift(jax.random.key(0), images, beta, IDS),
               lambda: ldp.laplace_noise(jax.random.key(0), SHAPE, beta, IDS),
               lambda: ldp.ldp_epsilon_report(beta, (4, 4, 3))):
    with pytest.raises(ValueError, match='beta'):
      call()


def test_traced_beta_gives_exactly_the_same_release():
  key, images = jax.random.key(21), _images(5)
  for mechanism in (ldp.laplace_perturb, ldp.brightness_shift):
    np.testing.assert_array_equal(jax.jit(mechanism)(key, images, jnp.float32(0.3), IDS),
                                  mechanism(key, images, 0.3, IDS))
  with pytest.raises(Exception, match='beta=0.01 is out of range'):  # Refused when it runs.
    jax.block_until_ready(jax.jit(ldp.laplace_perturb)(key, images, jnp.float32(0.01), IDS))
