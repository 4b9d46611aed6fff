"""Tests of dpjax.visual_privacy: PSNR/SSIM in closed form, clipped-Laplace moments, attacks."""

import math

import jax
import numpy as np
import pytest

from dpjax import ldp
from dpjax import visual_privacy as vp

SIZE = 48


def _smooth_image(channels=3):
  """A smooth [SIZE, SIZE, C] test image in [0.2, 0.8] (no randomness)."""
  y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
  gray = 0.5 + 0.3 * np.sin(2 * np.pi * x) * np.cos(2 * np.pi * y)
  return np.repeat(gray[..., None], channels, axis=-1).astype(np.float32)


def _release(image, beta, seed=0, grayscale=False):
  return np.asarray(ldp.laplace_perturb(jax.random.key(seed), image[None], beta,
                                        np.array([0], np.int32), grayscale=grayscale))[0]


def test_psnr_closed_form():
  a = np.zeros((8, 8, 3))
  assert vp.psnr(a, a + 0.1) == pytest.approx(20.0)  # MSE 0.01 -> 10 log10(1 / 0.01).
  assert vp.psnr(a, a + 25.5, data_range=255.0) == pytest.approx(20.0)
  half = a.copy()
  half[:4] = 0.5  # MSE = 0.25 / 2.
  assert vp.psnr(a, half) == pytest.approx(10 * math.log10(8.0))
  assert vp.psnr(a, a) == math.inf


def test_ssim_identical_is_one_and_symmetric():
  image = _smooth_image()
  assert vp.ssim(image, image) == pytest.approx(1.0)
  assert vp.ssim(image[..., 0], image[..., 0]) == pytest.approx(1.0)
  other = np.random.default_rng(0).uniform(size=image.shape)
  assert vp.ssim(image, other) == pytest.approx(vp.ssim(other, image))


def test_ssim_of_constant_images_closed_form():
  # Zero variance and covariance: SSIM = (2 a b + C1) / (a^2 + b^2 + C1) at every pixel.
  a, b = np.full((SIZE, SIZE), 0.2), np.full((SIZE, SIZE), 0.6)
  c1 = (0.01 * 1.0) ** 2
  assert vp.ssim(a, b) == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1), abs=1e-9)


def test_ssim_matches_explicit_gaussian_windows():
  """Brute force over 11x11 windows (sigma 1.5) that lie inside the image, per Wang et al. 2004."""
  rng = np.random.default_rng(1)
  a = rng.uniform(size=(16, 17))
  b = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
  offsets = np.arange(-5, 6)
  window = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 1.5**2))
  window /= window.sum()
  c1, c2 = 0.01**2, 0.03**2
  values = []
  for i in range(5, a.shape[0] - 5):
    for j in range(5, a.shape[1] - 5):
      pa, pb = a[i - 5:i + 6, j - 5:j + 6], b[i - 5:i + 6, j - 5:j + 6]
      mu_a, mu_b = np.sum(window * pa), np.sum(window * pb)
      var_a = np.sum(window * (pa - mu_a) ** 2)
      var_b = np.sum(window * (pb - mu_b) ** 2)
      cov = np.sum(window * (pa - mu_a) * (pb - mu_b))
      values.append((2 * mu_a * mu_b + c1) * (2 * cov + c2)
                    / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
  assert vp.ssim(a, b) == pytest.approx(np.mean(values), abs=1e-9)


def test_ssim_and_psnr_decrease_with_noise():
  image = _smooth_image()
  releases = [_release(image, beta) for beta in (0.02, 0.1, 0.5)]
  ssims = [vp.ssim(image, r) for r in releases]
  psnrs = [vp.psnr(image, r) for r in releases]
  assert 1.0 > ssims[0] > ssims[1] > ssims[2]
  assert psnrs[0] > psnrs[1] > psnrs[2]


def test_ssim_averages_channels():
  image = _smooth_image()
  noisy = image.copy()
  noisy[..., 1] = np.clip(noisy[..., 1] + 0.1 * np.sign(np.sin(np.arange(SIZE))), 0, 1)
  per_channel = [vp.ssim(image[..., c], noisy[..., c]) for c in range(3)]
  assert vp.ssim(image, noisy) == pytest.approx(np.mean(per_channel))


def test_clipped_laplace_moments_match_monte_carlo():
  beta = 1.0
  levels = np.array([0.0, 0.3, 0.5, 0.9], np.float32)
  images = np.broadcast_to(levels[:, None], (4, 50_000))
  released = np.asarray(ldp.laplace_perturb(jax.random.key(2), images, beta, np.arange(4)))
  np.testing.assert_allclose(released.mean(axis=1), vp.clipped_laplace_mean(levels, beta), atol=0.01)
  np.testing.assert_allclose(released.var(axis=1), vp.clipped_laplace_variance(levels, beta),
                             atol=0.01)
  # Small beta: no clipping, the mean is x and the variance 2 beta^2.
  assert vp.clipped_laplace_mean(0.5, 0.01) == pytest.approx(0.5)
  assert vp.clipped_laplace_variance(0.5, 0.01) == pytest.approx(2e-4, rel=1e-6)
  x = np.linspace(0, 1, 11)
  np.testing.assert_allclose(vp.invert_clipped_laplace_mean(vp.clipped_laplace_mean(x, 2.0), 2.0),
                             x, atol=1e-4)


def test_slope_and_filter_weights_closed_forms():
  x, beta, h = np.linspace(0.05, 0.95, 7), 0.7, 1e-6
  numeric = (vp.clipped_laplace_mean(x + h, beta) - vp.clipped_laplace_mean(x - h, beta)) / (2 * h)
  np.testing.assert_allclose(vp.clipped_laplace_mean_slope(x, beta), numeric, rtol=1e-6)
  # A 2-D Gaussian filter of std s scales white-noise variance by about 1 / (4 pi s^2).
  assert vp._gaussian_sum_of_squared_weights(4.0) == pytest.approx(1 / (4 * math.pi * 16), rel=1e-3)


def test_unclipped_wiener_shrinks_pure_noise_to_the_local_mean():
  # Unclipped noise far above the image variance: the gain is 0 and the estimate the local mean.
  image = _smooth_image()
  noise = np.asarray(ldp.laplace_noise(jax.random.key(4), (1,) + image.shape, 0.05, np.array([0])))[0]
  noisy = image + noise
  estimate = vp.wiener_attack(noisy, 0.05, sigma=2.0, clipped=False)
  assert vp.psnr(estimate, image) > vp.psnr(noisy, image) + 5.0
  flat = vp.wiener_attack(noisy, 10.0, sigma=2.0, clipped=False)
  np.testing.assert_allclose(flat, np.clip(vp.gaussian_attack(noisy, 2.0), 0, 1))


def test_denoising_attacks_recover_much_at_beta_1():
  """What is true at beta = 1 (checked, not assumed) for a smooth image: the release scores
  ~7 dB; Gaussian and Wiener attacks gain > 10 dB (median, hurt by the clipped 0/1 values,
  > 4 dB); the best beats the structure-free flat baseline clearly in SSIM, less in PSNR."""
  image = _smooth_image()
  result = vp.best_denoising_attack(_release(image, 1.0), image, 1.0)
  released = result['released']['psnr']
  assert 6.0 < released < 9.0
  assert result['attacks']['median']['psnr'] > released + 4.0
  assert result['attacks']['gaussian']['psnr'] > released + 10.0
  assert result['attacks']['wiener']['psnr'] > released + 10.0
  assert result['best_attack'] == 'wiener'  # Modelling the clipped noise helps (1.3 dB here).
  assert result['best_psnr'] > result['flat_baseline']['psnr'] + 2.0
  assert result['best_ssim'] > result['flat_baseline']['ssim'] + 0.15
  assert result['best_ssim'] > result['released']['ssim'] + 0.4
  assert result['best_image'].shape == image.shape
  assert result['best_image'].min() >= 0.0 and result['best_image'].max() <= 1.0


def test_grayscale_attacker_gains_from_channel_copies():
  # A gray image noised per channel (grayscale=False) holds 3 independent noise draws;
  # averaging them helps.
  image = _smooth_image()
  release = _release(image, 1.0)
  assert vp.independent_channel_copies(release) == 3
  per_channel = vp.best_denoising_attack(release, image, 1.0)
  gray = vp.best_denoising_attack(release, image, 1.0, grayscale=True)
  assert gray['noise_copies'] == 3 and per_channel['noise_copies'] == 1
  assert gray['best_psnr'] > per_channel['best_psnr'] + 1.0
  np.testing.assert_array_equal(gray['best_image'][..., 0], gray['best_image'][..., 2])


def test_grayscale_attacker_gains_nothing_from_a_grey_release():
  # Released with grayscale=True, the 3 channels are one draw: the channel mean is the release
  # itself, the attack models ONE copy (not 3) and scores as the per-channel attack.
  image = _smooth_image()
  release = _release(image, 1.0, grayscale=True)
  assert vp.independent_channel_copies(release) == 1
  per_channel = vp.best_denoising_attack(release, image, 1.0)
  gray = vp.best_denoising_attack(release, image, 1.0, grayscale=True)
  assert gray['noise_copies'] == 1
  assert gray['best_attack'] == per_channel['best_attack']
  assert gray['best_psnr'] == pytest.approx(per_channel['best_psnr'], abs=1e-9)
  assert gray['best_ssim'] == pytest.approx(per_channel['best_ssim'], abs=1e-9)
  # One draw is worth less to the attacker than three: the grey release is recovered worse than
  # the per-channel release of the same image (by 0.4 to 4.8 dB over seeds 0-5; 0.9 dB here).
  per_channel_release = vp.best_denoising_attack(_release(image, 1.0), image, 1.0,
                                                 grayscale=True)
  assert gray['best_psnr'] < per_channel_release['best_psnr']


def test_no_attack_beats_a_small_brightness_shift():
  # The paper variant keeps all structure: the release itself scores best ('none').
  image = _smooth_image()
  shifted = np.asarray(ldp.brightness_shift(jax.random.key(3), image[None], 0.05,
                                            np.array([0], np.int32)))[0]
  result = vp.best_denoising_attack(shifted, image, 0.05)
  assert result['best_attack'] == 'none'
  assert result['released']['ssim'] > 0.9


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match='same shape'):
    vp.psnr(np.zeros((4, 4)), np.zeros((4, 5)))
  with pytest.raises(ValueError, match='SSIM window'):
    vp.ssim(np.zeros((8, 8)), np.zeros((8, 8)))
  with pytest.raises(ValueError, match='beta'):
    vp.best_denoising_attack(np.zeros((16, 16)), np.zeros((16, 16)), 0.0)
  with pytest.raises(ValueError, match='grayscale'):
    vp.best_denoising_attack(np.zeros((16, 16)), np.zeros((16, 16)), 1.0, grayscale=True)
  with pytest.raises(ValueError, match=r'\[H, W, C\]'):
    vp.independent_channel_copies(np.zeros((16, 16)))
