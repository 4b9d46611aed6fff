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
  """The released image is clip(image + laplace_noise) with the noise of the same key and ids."""
  key, images = jax.random.key(1), _images()
  noise = np.asarray(ldp.laplace_noise(key, SHAPE, 0.5, IDS))
  released = np.asarray(ldp.laplace_perturb(key, images, 0.5, IDS))
  assert released.dtype == np.float32
  np.testing.assert_allclose(released, np.clip(images + noise, 0.0, 1.0), atol=1e-6)


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
  expected = np.clip(images[..., :1] + noise, 0.0, 1.0)
  np.testing.assert_allclose(released, np.broadcast_to(expected, GREY_SHAPE), atol=1e-6)
  assert 0.2 < np.mean((released > 0) & (released < 1)) < 0.9  # Noise shows, not all clipped.
  # A colour image with grayscale=True releases its channel mean (a grey version).
  colour = np.random.default_rng(5).uniform(size=GREY_SHAPE).astype(np.float32)
  from_colour = np.asarray(ldp.laplace_perturb(key, colour, beta, IDS, grayscale=True))
  np.testing.assert_allclose(
      from_colour, np.broadcast_to(np.clip(colour.mean(-1, keepdims=True) + noise, 0, 1),
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
  np.testing.assert_allclose(released, np.clip(images + expected, 0.0, 1.0), atol=1e-6)
  unclipped = (released > 0.0) & (released < 1.0)
  assert unclipped.mean() > 0.5  # Enough pixels to check.
  np.testing.assert_allclose((released - images)[unclipped], expected[unclipped], atol=1e-6)
  # Same every epoch, keyed on the id, not the position.
  order = np.arange(len(IDS))[::-1]
  np.testing.assert_array_equal(ldp.brightness_shift(key, images[order], beta, IDS[order]),
                                released[order])


def test_brightness_shift_leaves_pixel_differences_intact():
  # Why it gives no image-level DP: for an unclipped image, y_i - y_j = x_i - x_j exactly.
  images = _images(4, 0.45, 0.55)
  released = np.asarray(ldp.brightness_shift(jax.random.key(11), images, 0.01, IDS))
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
  assert 'eps=50176 per 224x224x3 grey image' in line and 'per pixel value' not in line
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
