"""How much of an image survives local-DP noise: PSNR, SSIM, and denoising attacks.

These are empirical measures, not privacy guarantees: a high PSNR/SSIM after an attack shows
that an image is still recognisable; a low one proves nothing about privacy. The formal
guarantees are in `dpjax.ldp.ldp_epsilon_report`.

Images are numpy arrays (host side, for analysis and figures) of shape [H, W] or [H, W, C]
with values on a scale of width `data_range` (1.0 for [0, 1] images).

The attacks are what anyone holding a released noisy image can run. The attacker knows the
mechanism and beta (public), so the Wiener-style attack models the noise exactly, including the
clipping to [0, 1]: a clipped Laplace release y = clip(x + n) has mean
f(x) = x + beta/2 (exp(-x/beta) - exp(-(1-x)/beta)), which is increasing in x, so a local
average of y estimates f(x) and inverting f undoes the loss of contrast.

Grey images (chest X-rays) are fed to the network as C equal channels. Released with
`ldp.laplace_perturb(..., grayscale=True)` they carry ONE noise draw per grey pixel and their
channels are identical: averaging them gains the attacker nothing. Released with independent
noise per channel (`grayscale=False`), they hold C noisy copies of each grey pixel and the
channel average divides the noise variance by C. `best_denoising_attack(..., grayscale=True)`
tells the two apart from the release itself (identical channels or not).
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable

import numpy as np
from scipy import ndimage

# Wang et al. (2004): 11x11 Gaussian window of std 1.5; radius = int(3.5 * 1.5 + 0.5) = 5.
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_pair(a, b) -> tuple[np.ndarray, np.ndarray]:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f'Expected images of the same shape, got {a.shape} and {b.shape}')
  if a.ndim not in (2, 3):
    raise ValueError(f'Expected an image of shape [H, W] or [H, W, C], got {a.shape}')
  return a, b


def _spatial(image: np.ndarray, value: float) -> tuple[float, ...]:
  """A filter parameter that acts on the two spatial axes only, never across channels."""
  return (value, value) + (0,) * (image.ndim - 2)


def psnr(a, b, data_range: float = 1.0) -> float:
  """Peak signal-to-noise ratio in dB, 10 log10(data_range^2 / MSE); inf for identical images."""
  a, b = _as_pair(a, b)
  mse = float(np.mean((a - b) ** 2))
  if mse == 0.0:
    return float('inf')
  return float(10.0 * np.log10(data_range**2 / mse))


def ssim(a, b, data_range: float = 1.0) -> float:
  """Mean structural similarity (Wang et al. 2004), averaged over channels.

  Gaussian-weighted local statistics (11x11 window, std 1.5), K1 = 0.01, K2 = 0.03; the
  5-pixel border where the window leaves the image is excluded from the mean.
  """
  a, b = _as_pair(a, b)
  if a.ndim == 2:
    a, b = a[..., None], b[..., None]
  radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
  if min(a.shape[:2]) <= 2 * radius:
    raise ValueError(f'Expected images larger than the {2 * radius + 1}px SSIM window, got {a.shape}')
  c1 = (SSIM_K1 * data_range) ** 2
  c2 = (SSIM_K2 * data_range) ** 2

  def local_mean(image):
    return ndimage.gaussian_filter(image, sigma=(SSIM_SIGMA, SSIM_SIGMA, 0), truncate=SSIM_TRUNCATE,
                                   mode='reflect')

  mu_a, mu_b = local_mean(a), local_mean(b)
  var_a = local_mean(a * a) - mu_a**2
  var_b = local_mean(b * b) - mu_b**2
  cov = local_mean(a * b) - mu_a * mu_b
  ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
      (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
  inner = ssim_map[radius:-radius, radius:-radius]
  return float(np.mean(inner.mean(axis=(0, 1))))  # Per channel, then averaged.


def clipped_laplace_mean(x, beta: float) -> np.ndarray:
  """E[clip(x + n, 0, 1)] for n ~ Laplace(0, beta) and x in [0, 1] (closed form)."""
  x = np.asarray(x, np.float64)
  return x + 0.5 * beta * (np.exp(-x / beta) - np.exp(-(1.0 - x) / beta))


def clipped_laplace_variance(x, beta: float) -> np.ndarray:
  """Var[clip(x + n, 0, 1)] for n ~ Laplace(0, beta) and x in [0, 1] (closed form)."""
  x = np.asarray(x, np.float64)
  second_moment = (x**2 + 2 * beta**2 - beta**2 * np.exp(-x / beta)
                   - (beta + beta**2) * np.exp(-(1.0 - x) / beta))
  return np.maximum(second_moment - clipped_laplace_mean(x, beta) ** 2, 0.0)


def invert_clipped_laplace_mean(mean, beta: float) -> np.ndarray:
  """x in [0, 1] with E[clip(x + n)] = mean (the mean is clamped to the reachable range)."""
  grid = np.linspace(0.0, 1.0, 4097)
  return np.interp(np.asarray(mean, np.float64), clipped_laplace_mean(grid, beta), grid)


def median_attack(noisy, size: int = 5) -> np.ndarray:
  """Median filter over a size x size spatial window (per channel)."""
  noisy = np.asarray(noisy, np.float64)
  return ndimage.median_filter(noisy, size=(size, size) + (1,) * (noisy.ndim - 2),
                               mode='reflect')


def gaussian_attack(noisy, sigma: float = 2.0) -> np.ndarray:
  """Gaussian low-pass filter of std `sigma` pixels (per channel)."""
  noisy = np.asarray(noisy, np.float64)
  return ndimage.gaussian_filter(noisy, sigma=_spatial(noisy, sigma), mode='reflect')


def clipped_laplace_mean_slope(x, beta: float) -> np.ndarray:
  """d/dx E[clip(x + n, 0, 1)] = 1 - (exp(-x/beta) + exp(-(1-x)/beta)) / 2, in (0, 1]."""
  x = np.asarray(x, np.float64)
  return 1.0 - 0.5 * (np.exp(-x / beta) + np.exp(-(1.0 - x) / beta))


def _gaussian_sum_of_squared_weights(sigma: float) -> float:
  """sum(w^2) of the 2-D Gaussian filter: the variance factor of a filtered white noise."""
  delta = np.zeros(2 * int(4 * sigma + 0.5) + 1)
  delta[len(delta) // 2] = 1.0
  kernel = ndimage.gaussian_filter1d(delta, sigma, mode='constant')
  return float(np.sum(kernel**2) ** 2)


def wiener_attack(noisy, beta: float, sigma: float = 2.0, clipped: bool = True,
                  num_copies: int = 1) -> np.ndarray:
  """Wiener-style estimate using the known Laplace scale beta (per channel).

  Unclipped release (`clipped=False`): the classic local Wiener filter. With local mean m and
  local variance v (Gaussian window of std `sigma`) and noise variance s2 = 2 beta^2, the
  estimate is m + max(v - s2, 0) / v * (y - m).

  Clipped release (`clipped=True`, what `ldp.laplace_perturb` produces): y = clip(x + n) has
  mean f(x) and a variance known in closed form. The local mean m estimates f(x); the level
  l = f^-1(m) estimates x, with variance Var[y] * sum(w^2) / f'(l)^2 (delta method). The
  levels are then shrunk toward their mean with the Wiener gain s2_x / (s2_x + var(l)), where
  s2_x is the image variance left after subtracting that estimation noise.
  `num_copies` > 1 means `noisy` is the average of that many independent releases of the same
  image (e.g. the 3 channels of a grey X-ray noised independently per channel), which divides
  the noise variance. A grey release with one draw per grey pixel (identical channels) is ONE
  release: `num_copies=1`.
  """
  noisy = np.asarray(noisy, np.float64)
  local_mean = gaussian_attack(noisy, sigma)
  if not clipped:
    local_var = np.maximum(gaussian_attack(noisy**2, sigma) - local_mean**2, 1e-12)
    noise_var = 2.0 * beta**2 / num_copies
    gain = np.maximum(local_var - noise_var, 0.0) / local_var
    return np.clip(local_mean + gain * (noisy - local_mean), 0.0, 1.0)
  level = invert_clipped_laplace_mean(local_mean, beta)
  level_var = (clipped_laplace_variance(level, beta) / num_copies
               * _gaussian_sum_of_squared_weights(sigma)
               / np.maximum(clipped_laplace_mean_slope(level, beta), 1e-3) ** 2)
  spatial = (0, 1)
  centre = level.mean(axis=spatial, keepdims=True)
  signal_var = np.maximum(level.var(axis=spatial, keepdims=True)
                          - level_var.mean(axis=spatial, keepdims=True), 0.0)
  gain = signal_var / (signal_var + level_var)
  return np.clip(centre + gain * (level - centre), 0.0, 1.0)


# Each attack at a few strengths; the attacker cannot score them without the original, so the
# best one reported below is an optimistic (oracle) view of what these attacks recover.
ATTACK_SETTINGS: dict[str, tuple[float, ...]] = {
    'median': (3, 5),  # Larger medians cost more and never won in our runs.
    'gaussian': (1.0, 2.0, 4.0),
    'wiener': (1.0, 2.0, 4.0),
}


def _run_attack(name: str, noisy: np.ndarray, beta: float, setting: float,
                num_copies: int) -> np.ndarray:
  attacks: dict[str, Callable[[], np.ndarray]] = {
      'median': lambda: median_attack(noisy, int(setting)),
      'gaussian': lambda: gaussian_attack(noisy, setting),
      'wiener': lambda: wiener_attack(noisy, beta, setting, num_copies=num_copies),
  }
  return attacks[name]()


def independent_channel_copies(noisy) -> int:
  """How many independent noisy copies of a grey image an [H, W, C] release holds.

  1 when the C channels are identical (one noise draw per grey pixel, as
  `ldp.laplace_perturb(..., grayscale=True)` releases), C otherwise (one draw per channel:
  averaging the channels divides the noise variance by C).
  """
  noisy = np.asarray(noisy)
  if noisy.ndim != 3:
    raise ValueError(f'Expected an [H, W, C] image, got {noisy.shape}')
  shared = all(np.array_equal(noisy[..., 0], noisy[..., c]) for c in range(1, noisy.shape[-1]))
  return 1 if shared else noisy.shape[-1]


def best_denoising_attack(noisy, original, beta: float, data_range: float = 1.0,
                          grayscale: bool = False) -> dict[str, Any]:
  """Runs each denoising attack on a released image and scores it against the original.

  Args:
    noisy: the released (perturbed, clipped) image, [H, W] or [H, W, C], values in [0, 1].
    original: the clean image, same shape.
    beta: the Laplace scale of the release (known to the attacker).
    data_range: width of the value scale, for PSNR/SSIM.
    grayscale: the attacker knows the image is one gray channel replicated C times (chest
      X-rays fed to an RGB network), so it attacks the channel mean and replicates the
      estimate back. The number of independent copies in that mean is read off the release
      (`independent_channel_copies`): 1 when the channels are identical (one draw per grey
      pixel, `ldp.laplace_perturb(..., grayscale=True)`), C when each channel was noised
      independently (the mean is then C releases averaged: C times less noise variance).

  Returns:
    {'released': {'psnr', 'ssim'} of the release itself,
     'flat_baseline': {'psnr', 'ssim'} of a constant image per channel at the de-biased mean
       level of the release (what an attack recovering no structure at all would score),
     'attacks': {name: {'psnr', 'ssim', 'setting', 'image'}} (best setting of each, by PSNR),
     'best_attack': name of the attack with the highest PSNR, or 'none' when no attack beats
       the release itself, 'best_psnr', 'best_ssim', 'best_image',
     'noise_copies': independent noisy copies the attack averaged (1 unless `grayscale` and
       the channels were noised independently)}.
  """
  noisy, original = _as_pair(noisy, original)
  if not beta > 0:
    raise ValueError(f'Expected Laplace scale {beta=} > 0')
  if grayscale and noisy.ndim != 3:
    raise ValueError(f'Expected an [H, W, C] image with grayscale=True, got {noisy.shape}')
  num_copies = independent_channel_copies(noisy) if grayscale else 1
  attack_input = noisy.mean(axis=-1) if grayscale else noisy
  released = {'psnr': psnr(noisy, original, data_range), 'ssim': ssim(noisy, original, data_range)}
  # Structure-free reference: one de-biased level per channel. An attack that barely beats it
  # has recovered little more than the average intensity.
  channel_means = noisy.mean(axis=(0, 1), keepdims=True)
  flat = np.broadcast_to(invert_clipped_laplace_mean(channel_means, beta), noisy.shape)
  flat_baseline = {'psnr': psnr(flat, original, data_range), 'ssim': ssim(flat, original, data_range)}
  attacks = {}
  for name, settings in ATTACK_SETTINGS.items():
    candidates = []
    for setting in settings:
      image = _run_attack(name, attack_input, beta, setting, num_copies)
      if grayscale:
        image = np.repeat(image[..., None], noisy.shape[-1], axis=-1)
      candidates.append((psnr(image, original, data_range), setting, image))
    best_psnr, setting, image = max(candidates, key=lambda c: c[0])
    attacks[name] = {'psnr': best_psnr, 'ssim': ssim(image, original, data_range),
                     'setting': setting, 'image': image}
  best_name = max(attacks, key=lambda n: attacks[n]['psnr'])
  if attacks[best_name]['psnr'] <= released['psnr']:
    best = {'name': 'none', **released, 'image': noisy}
  else:
    best = {'name': best_name, **attacks[best_name]}
  return {'released': released, 'flat_baseline': flat_baseline, 'attacks': attacks,
          'best_attack': best['name'],
          'best_psnr': best['psnr'], 'best_ssim': best['ssim'], 'best_image': best['image'],
          'noise_copies': num_copies}
