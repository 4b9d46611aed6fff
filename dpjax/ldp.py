"""Local differential privacy on training images: Laplace noise drawn once per example.

The paper ("Benchmarking Differentially Private Residual Networks for Medical Imagery") released
one noisy copy of each training image. Two mechanisms live here:

* `laplace_perturb`: Laplace noise of scale beta on every pixel value of a [0, 1] image, as the
  paper's text describes. Grey images (chest X-rays, stored as three equal RGB channels) take
  `grayscale=True`: ONE noise value per grey pixel, copied to the three channels. Noising the
  three copies independently would release each grey pixel three times (an attacker averages
  the channels and divides the noise variance by 3): its cost would be 3/beta, not 1/beta.
* `brightness_shift`: what the paper's released code did: ONE Laplace value per image added to
  every pixel. It is a brightness shift and gives no image-level guarantee.

Both key the noise on a stable example id, so an example receives the same noise in every
epoch (re-drawing it each epoch would release several noisy copies and compose the privacy
loss). Only training images are perturbed; the trainer leaves the test set clean.

Floating point. float32 `x + beta * jax.random.laplace` is not 1/beta-DP: its noise is bounded
by 16.6 beta (a 23-bit uniform), so for small beta some outputs are impossible from a
neighbouring pixel value, and the rounding of x + noise leaks x's low-order bits (Mironov, "On
significance of the least significant bits for differential privacy", CCS 2012). Mironov's
snapping mechanism would fix both, but its grid is the power of two >= beta: for the paper's
beta in [0.125, 1] the release would have 2 to 9 grey levels. Here instead the mechanism is
discrete and analysed exactly: a pixel value x is rounded to its level q = round(255 x) in
{0..255} (the 8-bit value it was read from), the noise K is the discrete Laplace distribution
(two-sided geometric, P(K = k) proportional to exp(-|k| / (255 beta)), i.e. Laplace(0, beta)
on the 1/255 grid), and the release is clip(q + K, 0, 255) / 255, an 8-bit image. K is drawn
by integer comparison of 96 random bits (a sign bit and a 95-bit integer) with a table of
thresholds built on the host for beta (x (1 + 2^-20): SCALE_MARGINS), so the probability of
every output level is a known integer multiple of 2^-96. `realized_pixel_epsilon` computes the
largest log-ratio of these probabilities over all pairs of inputs: that is the exact epsilon
of the implementation, and the table is built so that it is <= 1/beta. Betas for which 96 bits
cannot achieve that are refused: below about 0.016 (the rarest levels would need
probabilities under 2^-96) and above about 1e5 (epsilon < 1e-5 per pixel; two thresholds would
share a search key). Cost: three random words and a 9-step table search per value, 4 to
4.5x the float32 sampler it replaced on a CPU (`python -m benchmarks.noise_sampler`).

No single unqualified epsilon describes local DP on images: `ldp_epsilon_report` states each
epsilon together with the neighbouring relation it refers to.

>>> report = ldp_epsilon_report(1.0, (224, 224, 3))
>>> report['per_pixel_epsilon'], report['per_image_epsilon']
(1.0, 150528.0)
>>> grey = ldp_epsilon_report(1.0, (224, 224, 3), grayscale=True)  # One value per grey pixel.
>>> grey['per_pixel_epsilon'], grey['per_image_epsilon']
(1.0, 50176.0)
>>> realized_pixel_epsilon(1.0) <= 1.0
True
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

VARIANTS = ('laplace', 'paper_brightness')

LEVELS = 255  # The output grid: an 8-bit image, levels 0..255 for [0, 1].
# The table is built for beta * (1 + margin), the first margin whose exact epsilon is <= 1/beta
# (2^-20 for 0.0175 <= beta; larger only just above the smallest betas accepted).
SCALE_MARGINS = (2.0**-20, 2.0**-16, 2.0**-12, 2.0**-8)
MIN_BETA, MAX_BETA = 0.016, 1e5  # About the range of betas the exact mechanism accepts.
_MAGNITUDE_BITS = 95  # Of the 96 random bits per noise value, one is the sign.
_SEARCH_STEPS = tuple(2**i for i in reversed(range(8)))  # Binary search over levels 0..255.
assert sum(_SEARCH_STEPS) == LEVELS

PER_PIXEL_RELATION = ('one pixel value of one image replaced by any other value in [0, 1], '
                      'all other pixel values fixed')
GREY_PER_PIXEL_RELATION = ('one grey pixel of one image (its value, shared by all channels) '
                           'replaced by any other value in [0, 1], all other pixels fixed')
PER_IMAGE_RELATION = ('one image replaced by any other image of the same shape, pixel values '
                      'in [0, 1] (replace-one-record local DP)')
BRIGHTNESS_RELATION = ('two images that differ only by a uniform offset c added to every pixel '
                       'value, |c| <= 1 on the [0, 1] scale (i.e. only in mean brightness), c a '
                       'whole number of 8-bit levels (a multiple of 1/255)')


def _check_beta(beta) -> None:
  """Validates beta when it is a concrete number (a traced one is checked by `_noise_table`'s
  host callback when it runs, and every beta by `_mechanism`)."""
  if isinstance(beta, numbers.Real) and not beta > 0:  # `not >` also rejects NaN.
    raise ValueError(f'Expected Laplace scale {beta=} > 0')


def _check_ids(shape: Sequence[int], example_ids) -> None:
  if jnp.ndim(example_ids) != 1:
    raise ValueError(f'Expected example_ids of shape [N], got shape {jnp.shape(example_ids)}')
  if not jnp.issubdtype(jnp.result_type(example_ids), jnp.integer):
    raise ValueError(f'Expected integer example_ids, got dtype {jnp.result_type(example_ids)}')
  if len(shape) < 1 or shape[0] != jnp.shape(example_ids)[0]:
    raise ValueError(f'Expected one example id per image: images have shape {tuple(shape)}, '
                     f'example_ids have shape {jnp.shape(example_ids)}')


def _check_images(images) -> None:
  if not jnp.issubdtype(jnp.result_type(images), jnp.floating):
    raise ValueError(f'Expected float images scaled to [0, 1], got dtype {jnp.result_type(images)}')


def _check_grayscale_shape(shape: Sequence[int], what: str) -> None:
  # The channel axis is the last one; without it (e.g. [N, H, W]) the channel mean would
  # silently average over the image width.
  if len(shape) != 4:
    raise ValueError(f'Expected {what} [N, H, W, C] with a trailing channel axis with '
                     f'grayscale=True, got shape {tuple(shape)}')


def grey_noise_shape(shape: Sequence[int]) -> tuple[int, int, int, int]:
  """Shape of the grey noise for images of `shape` = [N, H, W, C]: one value per grey pixel."""
  n, h, w, _ = (int(s) for s in shape)
  return (n, h, w, 1)


def _example_keys(key: jax.Array, example_ids: jax.Array) -> jax.Array:
  # The key depends on the id only, never on the position in the batch or on the step.
  return jax.vmap(lambda example_id: jax.random.fold_in(key, example_id))(example_ids)


# The discrete Laplace noise: host tables, exact epsilon, device sampler.

def _float32_beta(beta) -> float:
  # The table is a function of float32(beta) only, so a traced float32 beta (jit) and the same
  # Python float give the same noise; the margins (>= 2^-20) exceed float32 rounding (2^-24).
  value = float(np.float32(beta))
  if not (math.isfinite(value) and value > 0):
    raise ValueError(f'Expected a finite Laplace scale beta > 0, got {beta!r}')
  return value


def _thresholds(beta32: float, margin: float) -> tuple[int, ...] | None:
  """T_m = round(2^95 P(|K| >= m)) for m = 0..255 (T_0 = 2^95): |K| = max{m : U < T_m}.

  U is the 95-bit integer of the random bits, the scale beta32 * (1 + margin). Level 255 stands
  for |K| >= 255 (the release clips there anyway). None when some level would have
  probability 0 (no pure DP).
  """
  a = 1.0 / (LEVELS * beta32 * (1.0 + margin))
  rho, one_minus_rho = math.exp(-a), -math.expm1(-a)
  thresholds = [1 << _MAGNITUDE_BITS]
  for m in range(1, LEVELS + 1):
    # P(|K| >= m) = 2 rho^m / (1 + rho), or 1 minus (1 - rho + 2 (rho - rho^m)) / (1 + rho):
    # whichever is smaller is computed, to relative precision 1e-16 (expm1), so that the
    # cells keep their precision for tiny and for huge beta alike.
    survival = 2.0 * math.exp(-a * m) / (1.0 + rho)
    if survival <= 0.5:
      thresholds.append(round(math.ldexp(survival, _MAGNITUDE_BITS)))
    else:
      below = (one_minus_rho - 2.0 * rho * math.expm1(-a * (m - 1))) / (1.0 + rho)
      thresholds.append((1 << _MAGNITUDE_BITS) - round(math.ldexp(below, _MAGNITUDE_BITS)))
  cells = [t - u for t, u in zip(thresholds, thresholds[1:] + [0])]
  keys = [_search_key(t) for t in thresholds]
  # Every level drawable (pure DP), and distinct search keys (the sampler's exactness).
  if min(cells) < 1 or any(k <= k_next for k, k_next in zip(keys, keys[1:])):
    return None
  return tuple(thresholds)


def _search_key(value: int) -> int:
  """(bit length << 24) | the 24 bits after the leading one: monotone in value, 32 bits.

  The sampler searches these keys (one word per step) and compares all 96 bits only at the
  one threshold whose key equals the random value's (`_split_words`).
  """
  length = value.bit_length()
  if length >= 25:
    mantissa = (value >> (length - 25)) & 0xFFFFFF
  else:
    mantissa = (value << (25 - length)) & 0xFFFFFF
  return (length << 24) | mantissa


def _epsilon_of(thresholds: tuple[int, ...]) -> float:
  """Largest log-ratio of output-level probabilities over pairs of input levels, rounded up."""
  magnitude = [t - u for t, u in zip(thresholds, thresholds[1:] + (0,))]  # x 2^-95
  # P(K = k) x 2^96 for k = -255..255 (the sign bit halves every |k| > 0; +-255: |K| >= 255).
  weight = [magnitude[abs(k)] if k else 2 * magnitude[0] for k in range(-LEVELS, LEVELS + 1)]
  cumulative = [0]
  for w in weight:
    cumulative.append(cumulative[-1] + w)
  total = cumulative[-1]
  worst = 0.0
  for level in range(LEVELS + 1):
    if level == 0:  # P(q + K <= 0) = P(K <= -q).
      probabilities = [cumulative[LEVELS - q + 1] for q in range(LEVELS + 1)]
    elif level == LEVELS:  # P(K >= 255 - q).
      probabilities = [total - cumulative[2 * LEVELS - q] for q in range(LEVELS + 1)]
    else:
      probabilities = [weight[level - q + LEVELS] for q in range(LEVELS + 1)]
    worst = max(worst, math.log(max(probabilities)) - math.log(min(probabilities)))
  return worst * (1.0 + 1e-12)  # Rounded up past float64 error in the logarithms.


@functools.lru_cache(maxsize=64)
def _mechanism(beta32: float) -> tuple[float, tuple[int, ...], float]:
  """(margin, thresholds, exact epsilon) for beta32: the first margin whose epsilon <= 1/beta.

  The target leaves 2^-22 for any beta that rounds to beta32 (float32 rounding is 2^-24).
  """
  target = (1.0 / beta32) * (1.0 - 2.0**-22)
  for margin in SCALE_MARGINS:
    thresholds = _thresholds(beta32, margin)
    if thresholds is not None:
      epsilon = _epsilon_of(thresholds)
      if epsilon <= target:
        return margin, thresholds, epsilon
  raise ValueError(f'Laplace scale beta={beta32:g} is out of range: with 96 random bits its '
                   'noise levels cannot be drawn exactly with probabilities whose epsilon is <= '
                   f'1/beta (accepted: {MIN_BETA} <= beta <= {MAX_BETA:g}; beta < 0.02 is '
                   'epsilon > 50 per pixel)')


@functools.lru_cache(maxsize=64)
def _table(beta32: float) -> np.ndarray:
  """uint32 [4, 256]: the thresholds' search keys, then their top (31 bits), middle and low
  32-bit words."""
  mask = (1 << 32) - 1
  thresholds = _mechanism(beta32)[1]
  return np.array([[_search_key(t) for t in thresholds]]
                  + [[(t >> shift) & mask for t in thresholds] for shift in (64, 32, 0)],
                  np.uint32)


def _table_callback(beta) -> np.ndarray:
  return _table(_float32_beta(np.asarray(beta).item()))


def _noise_table(beta) -> jax.Array:
  """The thresholds for beta, built on the host: directly, or by a callback when traced."""
  if isinstance(beta, jax.core.Tracer):
    return jax.pure_callback(_table_callback,
                             jax.ShapeDtypeStruct((4, LEVELS + 1), jnp.dtype(jnp.uint32)),
                             beta, vmap_method='sequential')
  return jnp.asarray(_table(_float32_beta(beta)))


def realized_pixel_epsilon(beta) -> float:
  """The exact pure epsilon of one released pixel value (or grey pixel), as implemented.

  max over output levels j and input values x, x' in [0, 1] of ln(P(j | x) / P(j | x')),
  computed from the integer thresholds the sampler compares its random bits with (so from
  the probabilities the implementation realises, not those of the ideal mechanism), rounded
  up by 1e-12 relative. Always <= 1/beta (by construction: about 1/beta / (1 + 2^-20));
  raises ValueError for a beta the mechanism refuses.
  """
  return _mechanism(_float32_beta(beta))[2]


def _key_of_words(top, middle, low):
  """`_search_key` of the 95-bit integer (top, middle, low), in uint32 arithmetic."""
  top_nonzero, middle_nonzero = top != 0, middle != 0
  high = jnp.where(top_nonzero, top, jnp.where(middle_nonzero, middle, low))
  below = jnp.where(top_nonzero, middle, jnp.where(middle_nonzero, low, jnp.uint32(0)))
  offset = jnp.where(top_nonzero, 64, jnp.where(middle_nonzero, 32, 0)).astype(jnp.uint32)
  zeros = jax.lax.clz(high)  # 32 only when the value is 0 (then all words are 0).
  length = jnp.where(high == 0, jnp.uint32(0), offset + 32 - zeros)
  # The leading one lands on bit 31 (shifts by 32 are avoided, not relied on to give 0).
  carried = jnp.where(zeros == 0, jnp.uint32(0), below >> jnp.minimum(32 - zeros, 31))
  normalized = jnp.where(zeros == 32, jnp.uint32(0), high << jnp.minimum(zeros, 31)) | carried
  return (length << 24) | ((normalized >> 7) & 0xFFFFFF)


def _split_words(words: jax.Array, table: jax.Array) -> jax.Array:
  """Random words uint32 [3, ...] -> K (int32), |K| <= 255 (255 meaning >= 255), exactly.

  The top bit is the sign, the other 95 bits the integer U; |K| = max{m : U < T_m}, so
  P(|K| >= m) = T_m / 2^95. Search on 32-bit keys (monotone in U and T, distinct for the
  thresholds): key(U) < key(T_m) implies U < T_m, and key(U) > key(T_m) implies U > T_m; the
  one threshold whose key may equal key(U) is then compared on all 95 bits.
  """
  top, middle, low = words[0], words[1], words[2]
  negative = (top >> 31) == 1
  top = top & 0x7FFFFFFF
  key = _key_of_words(top, middle, low)
  take = lambda row, index: table[row].at[index].get(mode='promise_in_bounds')
  magnitude = jnp.zeros(top.shape, jnp.int32)
  for step in _SEARCH_STEPS:  # Largest m with key(U) < key(T_m): then U < T_m for all m <= it.
    candidate = magnitude + step
    magnitude = jnp.where(key < take(0, candidate), candidate, magnitude)
  candidate = jnp.minimum(magnitude + 1, LEVELS)
  t_top, t_middle, t_low = take(1, candidate), take(2, candidate), take(3, candidate)
  below = jnp.where(top == t_top, (middle < t_middle) | ((middle == t_middle) & (low < t_low)),
                    top < t_top)
  tie = (magnitude < LEVELS) & (key == take(0, candidate))
  magnitude = jnp.where(tie & below, candidate, magnitude)
  return jnp.where(negative, -magnitude, magnitude)


def _example_noise(key, example_ids, shape, table, *, with_tail_keys=False):
  """Capped K [N, *shape] for each example (keyed on its id), and the keys of its tail."""
  def one(example_key):
    levels_key, tail_key = jax.random.split(example_key)
    return jax.random.bits(levels_key, (3,) + tuple(shape), jnp.uint32), tail_key
  words, tail_keys = jax.vmap(one)(_example_keys(key, example_ids))
  noise = _split_words(jnp.moveaxis(words, 1, 0), table)
  return (noise, tail_keys) if with_tail_keys else noise


def _quantize(values: jax.Array) -> jax.Array:
  """Pixel values -> levels round(255 x) in {0..255} (values outside [0, 1] clip, NaN -> 0)."""
  values = values.astype(jnp.float32)
  levels = jnp.round(jnp.clip(values, 0.0, 1.0) * LEVELS)
  return jnp.where(jnp.isnan(values), 0, levels).astype(jnp.int32)


def _release(levels: jax.Array, dtype) -> jax.Array:
  return (jnp.clip(levels, 0, LEVELS).astype(jnp.float32) / LEVELS).astype(dtype)


def laplace_noise(key: jax.Array, shape: Sequence[int], beta, example_ids: jax.Array,
                  dtype=jnp.float32, *, grayscale: bool = False) -> jax.Array:
  """Unclipped discrete Laplace noise of scale beta on the 1/255 grid, keyed on `example_ids`.

  P(noise = k / 255) is proportional to exp(-|k| / (255 beta)) (beta x (1 + 2^-20) exactly:
  SCALE_MARGINS), for images of `shape` [N, ...]. With `grayscale=False` the noise has `shape`:
  one value per pixel value. With `grayscale=True` (`shape` = [N, H, W, C]) it has shape
  [N, H, W, 1]: one value per grey pixel, which `laplace_perturb(..., grayscale=True)` adds to
  the grey image and copies to the C channels.

  Row i is drawn from `fold_in(key, example_ids[i])`, as in `laplace_perturb`, and is exactly
  the noise that `laplace_perturb` adds wherever |noise| < 1; beyond (where the release is
  clipped to 0 or 1 whatever the value) the tail is drawn in float32.

  Internal building block of `laplace_perturb`, exposed so its distribution can be tested.
  """
  shape = tuple(int(s) for s in shape)
  _check_beta(beta)
  _check_ids(shape, example_ids)
  if grayscale:
    _check_grayscale_shape(shape, 'a noise shape')
    shape = grey_noise_shape(shape)
  return _laplace_noise(key, shape, beta, example_ids, jnp.dtype(dtype), _noise_table(beta))


def _with_tail(capped, tail_keys, beta):
  """Capped K -> K with its tail: |K| >= 255 is 255 + Geometric(exp(-a)) (memoryless)."""
  words = jax.vmap(lambda k: jax.random.bits(k, capped.shape[1:], jnp.uint32))(tail_keys)
  exponential = -jnp.log((words.astype(jnp.float32) + 0.5) * 2.0**-32)
  rate = 1.0 / (LEVELS * jnp.asarray(beta, jnp.float32) * (1.0 + SCALE_MARGINS[0]))
  extra = jnp.floor(exponential / rate)
  magnitude = jnp.abs(capped).astype(jnp.float32)
  magnitude = jnp.where(magnitude == LEVELS, magnitude + extra, magnitude)
  return jnp.where(capped < 0, -magnitude, magnitude)


@functools.partial(jax.jit, static_argnames=('shape', 'dtype'))
def _laplace_noise(key, shape, beta, example_ids, dtype, table):
  capped, tail_keys = _example_noise(key, example_ids, shape[1:], table, with_tail_keys=True)
  return (_with_tail(capped, tail_keys, beta) / LEVELS).astype(dtype)


@functools.partial(jax.jit, static_argnames=('grayscale',))
def _laplace_perturb(key, images, table, example_ids, grayscale=False):
  if not grayscale:
    noise = _example_noise(key, example_ids, images.shape[1:], table)
    return _release(_quantize(images) + noise, images.dtype)
  grey = jnp.mean(images, axis=-1, keepdims=True)  # Exact (up to rounding) for equal channels.
  noise = _example_noise(key, example_ids, grey.shape[1:], table)
  return jnp.broadcast_to(_release(_quantize(grey) + noise, images.dtype), images.shape)


def laplace_perturb(key: jax.Array, images: jax.Array, beta, example_ids: jax.Array, *,
                    grayscale: bool = False) -> jax.Array:
  """Adds Laplace noise of scale beta to every pixel value (or grey pixel), clipped to [0, 1].

  Exactly: each pixel value x is rounded to its 8-bit level q = round(255 x) (x outside [0, 1]
  is clipped first, NaN counts as 0), discrete Laplace noise K with P(K = k) proportional to
  exp(-|k| / (255 beta)) is added (`laplace_noise`; the Laplace(0, beta) distribution on the
  1/255 grid), and the release is clip(q + K, 0, 255) / 255: an 8-bit image. Images read from
  8-bit files (as the trainer's are) lose nothing to the rounding.

  Runs jitted on device. The noise of example i is drawn from `fold_in(key, example_ids[i])`,
  so with the same `key` an example gets the SAME noise in every epoch and whatever its
  position in the batch: the training set is released once, as in the paper. Apply it to
  training images only; the test set is not perturbed (as in the paper), which the trainer
  handles.

  Colour images (`grayscale=False`, e.g. APTOS fundus photographs): one noise value per pixel
  value, d = H*W*C values per image.

  Grey images stored as C equal channels (`grayscale=True`, chest X-rays fed to an RGB
  network): the grey value of each pixel is taken once (the mean over the last, channel axis;
  for equal channels this is the grey value itself), ONE noise value is added per grey pixel
  (noise shape [N, H, W, 1]), the result is clipped and copied to all C channels, which are
  therefore identical in the release. d = H*W values per image. Noising the C copies of a grey
  pixel independently instead (`grayscale=False` on a grey image) releases that pixel C times:
  averaging the channels divides the noise variance by C, and the cost is C/beta per pixel
  (3/beta for RGB), not 1/beta. Given a colour image, `grayscale=True` releases its channel
  mean (a grey version), with the same guarantees.

  Formal guarantees:
    Per pixel value (colour) / per grey pixel (grey): epsilon = `realized_pixel_epsilon(beta)`
    <= 1/beta (pure, delta = 0) under the relation "one pixel value (grey: one grey pixel, i.e.
    all its channels) replaced by any other value in [0, 1], all others fixed". This is exact
    for the implementation, floating point included: the level q takes 256 values whatever
    the input, the noise is drawn by integer comparisons, and the epsilon is the largest
    log-ratio of the realised output probabilities (integer multiples of 2^-96) over all
    pairs of levels. Per image of d noised values (colour: d = H*W*C, e.g. 224*224*3 =
    150,528; grey: d = H*W, e.g. 224*224 = 50,176): d times that under "one image replaced by
    any other image" (replace-one-record local DP), by composition over the d values; tight
    for an all-black versus an all-white image. Clipping, scaling to [0, 1] and copying the
    grey value to the channels are post-processing and cost nothing.
    Using a different key, or a different id for the same image, releases a second noisy copy
    and the epsilons add up.

  Args:
    key: the run's LDP key (the same one every epoch).
    images: float array [N, ...] (e.g. NHWC) with values in [0, 1]; with `grayscale=True`,
      exactly [N, H, W, C] (channel axis last).
    beta: Laplace scale on the [0, 1] scale (> 0; betas outside about [0.016, 1e5] are
      refused: see the module docstring). A traced beta (under jit) gets the same noise as the same
      value passed as a number (its table is built on the host through a callback).
    example_ids: int array [N], a stable id per example.
    grayscale: the images are grey (C equal channels): one noise value per grey pixel.

  Returns:
    The perturbed images, same shape and dtype, values in {0, 1/255, ..., 1}.
  """
  _check_images(images)
  _check_beta(beta)
  _check_ids(jnp.shape(images), example_ids)
  if grayscale:
    _check_grayscale_shape(jnp.shape(images), 'images')
  return _laplace_perturb(key, images, _noise_table(beta), example_ids,
                          grayscale=bool(grayscale))


def brightness_offsets(key: jax.Array, beta, example_ids: jax.Array,
                       dtype=jnp.float32) -> jax.Array:
  """Unclipped per-image offsets [N] of `brightness_shift`, Laplace of scale beta on the 1/255 grid.

  The same discrete Laplace noise as `laplace_noise`, one value per image. Internal building
  block, exposed so its distribution can be tested.
  """
  _check_beta(beta)
  _check_ids(jnp.shape(example_ids), example_ids)
  return _brightness_offsets(key, beta, example_ids, jnp.dtype(dtype), _noise_table(beta))


@functools.partial(jax.jit, static_argnames=('dtype',))
def _brightness_offsets(key, beta, example_ids, dtype, table):
  capped, tail_keys = _example_noise(key, example_ids, (), table, with_tail_keys=True)
  return (_with_tail(capped, tail_keys, beta) / LEVELS).astype(dtype)


@jax.jit
def _brightness_shift(key, images, table, example_ids):
  offsets = _example_noise(key, example_ids, (), table)
  offsets = offsets.reshape((-1,) + (1,) * (images.ndim - 1))
  return _release(_quantize(images) + offsets, images.dtype)


def brightness_shift(key: jax.Array, images: jax.Array, beta, example_ids: jax.Array) -> jax.Array:
  """The paper's released-code "LDP": one Laplace value per image added to all pixels, clipped.

  The original code drew `np.random.laplace(0, 255 / eps, 1)` with eps = 1/beta, i.e. one
  Laplace(0, 255*beta) value on the [0, 255] scale, and added it to every pixel. Here that is
  one discrete Laplace value of scale beta on the 1/255 grid (`brightness_offsets`, as in
  `laplace_perturb`), added to the 8-bit levels round(255 x) of every pixel value, clipped,
  and scaled back to [0, 1]. Noise is keyed on the example id, identical in every epoch.
  Training images only; the test set is not perturbed.

  Formal guarantees:
    NONE at the image level (nor at the pixel level). The shift leaves every difference
    between two pixel values of the image unchanged, so two images that differ in anything
    other than a uniform offset are told apart with certainty (epsilon = infinity). What it
    does protect: the image's mean brightness, with epsilon = `realized_pixel_epsilon(beta)`
    <= 1/beta, under the relation "two images that differ only by a uniform offset of a whole
    number of 8-bit levels, |c| <= 1" (their levels differ by the same integer m, |m| <= 255:
    the ratio of output probabilities is one of those the per-pixel analysis bounds). Kept
    to reproduce the paper.

  Args and Returns: as `laplace_perturb`.
  """
  _check_images(images)
  _check_beta(beta)
  _check_ids(jnp.shape(images), example_ids)
  return _brightness_shift(key, images, _noise_table(beta), example_ids)


PERTURBATIONS: dict[str, Callable[..., jax.Array]] = {
    'laplace': laplace_perturb,
    'paper_brightness': brightness_shift,
}


def ldp_epsilon_report(beta: float, image_shape: Sequence[int], variant: str = 'laplace', *,
                       grayscale: bool = False) -> dict[str, Any]:
  """The local-DP epsilons of one released image, each with the relation it refers to.

  Args:
    beta: Laplace scale on the [0, 1] scale; refused (ValueError) where `laplace_perturb`
      refuses it (outside about [0.016, 1e5]).
    image_shape: shape of ONE perturbed image (e.g. (256, 256, 3)).
    variant: 'laplace' (per-pixel noise) or 'paper_brightness' (one offset per image).
    grayscale: the image is grey, stored as C equal channels and perturbed with
      `laplace_perturb(..., grayscale=True)` (one noise value per grey pixel). Then
      d = prod(image_shape[:-1]) = H*W values receive noise and the per-pixel relation is
      "one grey pixel replaced"; otherwise d = prod(image_shape) = H*W*C and it is "one pixel
      value replaced". (A grey image whose C copies were noised independently costs C/beta
      per grey pixel; this report does not describe that release.)

  Returns:
    A JSON-friendly dict: `variant`, `beta`, `image_shape`, `grayscale`, `num_pixel_values`
    (d, the number of noised values: H*W grey pixels or H*W*C pixel values),
    `per_pixel_epsilon` / `per_pixel_relation` (per grey pixel when `grayscale`),
    `per_image_epsilon` / `per_image_relation`,
    `guarantee` (one sentence), `explanation`, and `protected_statistic` /
    `protected_statistic_epsilon` / `protected_statistic_relation` (set for the paper variant,
    None otherwise). An epsilon is None where no guarantee holds. All epsilons are pure
    (delta = 0) and hold per example for one release; they are not DP-SGD epsilons. They hold
    for the implementation, floating point included: the per-pixel epsilon is
    max(1/beta, `realized_pixel_epsilon(beta)`), and the mechanism is built so that the
    latter, the exact epsilon of its integer probabilities, never exceeds 1/beta.
  """
  if variant not in VARIANTS:
    raise ValueError(f'Expected variant in {VARIANTS}, got {variant!r}')
  beta = float(beta)
  _check_beta(beta)
  exact = realized_pixel_epsilon(beta)  # Refuses a beta the mechanism refuses.
  per_pixel = max(1.0 / beta, exact)  # 1/beta: the table is built so that exact <= 1/beta.
  implementation = (
      ' As implemented (floating point included) the value is rounded to its 8-bit level and '
      'the noise is the discrete Laplace distribution on the 1/255 grid, drawn by integer '
      'comparison of 96 random bits with a table: the largest log-ratio of its output '
      f'probabilities, the exact epsilon, is {exact:.9g} <= 1/beta.')
  image_shape = tuple(int(s) for s in image_shape)
  if not image_shape or min(image_shape) < 1:
    raise ValueError(f'Expected a non-empty image_shape of positive sizes, got {image_shape}')
  grayscale = bool(grayscale)
  if grayscale and len(image_shape) != 3:
    raise ValueError(f'Expected an image_shape [H, W, C] with a trailing channel axis with '
                     f'grayscale=True, got {image_shape}')
  num_values = math.prod(image_shape[:-1]) if grayscale else math.prod(image_shape)
  per_image = num_values / beta if per_pixel == 1.0 / beta else num_values * per_pixel
  report = {
      'variant': variant,
      'beta': beta,
      'image_shape': list(image_shape),
      'grayscale': grayscale,
      'num_pixel_values': num_values,
      'per_pixel_relation': GREY_PER_PIXEL_RELATION if grayscale else PER_PIXEL_RELATION,
      'per_image_relation': PER_IMAGE_RELATION,
      'protected_statistic': None,
      'protected_statistic_epsilon': None,
      'protected_statistic_relation': None,
  }
  if variant == 'laplace' and grayscale:
    channels = image_shape[-1]
    report.update(
        per_pixel_epsilon=per_pixel,
        per_image_epsilon=per_image,
        guarantee=(f'epsilon = 1/beta = {1.0 / beta:g} per grey pixel; '
                   f'epsilon = d/beta = {num_values / beta:g} per image'),
        explanation=(
            f'Laplace(0, {beta:g}) noise drawn once for each of the d = {num_values} grey '
            'pixels (values in [0, 1], sensitivity 1 each) gives epsilon = 1/beta for one grey '
            'pixel; an image is d such values, so by composition epsilon = d/beta when the '
            f'whole image may change. The noisy grey value is clipped and copied to the '
            f'{channels} channels, which is post-processing. Noising the {channels} copies of a '
            f'grey pixel independently would release it {channels} times (averaging the '
            f'channels divides the noise variance by {channels}): epsilon = {channels}/beta = '
            f'{channels / beta:g} per pixel.' + implementation),
    )
  elif variant == 'laplace':
    report.update(
        per_pixel_epsilon=per_pixel,
        per_image_epsilon=per_image,
        guarantee=(f'epsilon = 1/beta = {1.0 / beta:g} per pixel value; '
                   f'epsilon = d/beta = {num_values / beta:g} per image'),
        explanation=(
            f'Laplace(0, {beta:g}) noise on each of the d = {num_values} pixel values in [0, 1] '
            '(sensitivity 1 each) gives epsilon = 1/beta for one value; an image is d such '
            'values, so by composition epsilon = d/beta when the whole image may change. '
            'Clipping to [0, 1] is post-processing.' + implementation),
    )
  else:
    report.update(
        per_pixel_epsilon=None,
        per_image_epsilon=None,
        guarantee='no image-level guarantee',
        explanation=(
            'One Laplace value is added to every pixel value: the differences between pixel '
            'values, i.e. all of the image except its mean brightness, are released exactly. '
            'Two images that differ in anything but a uniform offset are distinguishable with '
            'certainty (epsilon = infinity at both pixel and image level). Only the mean '
            f'brightness is protected, with epsilon = 1/beta = {1.0 / beta:g} (offsets of whole '
            '8-bit levels: the offset is discrete Laplace noise on the 1/255 grid, exact as '
            'for the per-pixel release).'),
        protected_statistic='mean brightness (a uniform offset of all pixel values)',
        protected_statistic_epsilon=per_pixel,
        protected_statistic_relation=BRIGHTNESS_RELATION,
    )
  return report


def format_ldp_epsilon(report: dict[str, Any]) -> str:
  """One line for printed summaries, e.g. 'LDP laplace beta=1: eps=1 per pixel value, ...'.

  Grey reports say 'per pixel (one grey pixel changed)' and 'per HxW grey image': the shape
  is that of the noised values (one per grey pixel, the channel axis dropped).
  """
  grey = report.get('grayscale', False)  # Reports written before the field existed: colour.
  noised_shape = report['image_shape'][:-1] if grey else report['image_shape']
  shape = 'x'.join(str(s) for s in noised_shape)
  head = f"LDP {report['variant']} beta={report['beta']:g}"
  if report['per_image_epsilon'] is not None:
    if grey:
      return (f"{head}: eps={report['per_pixel_epsilon']:g} per pixel (one grey pixel changed), "
              f"eps={report['per_image_epsilon']:g} per {shape} grey image (image replaced)")
    return (f"{head}: eps={report['per_pixel_epsilon']:g} per pixel value (one value changed), "
            f"eps={report['per_image_epsilon']:g} per {shape} image (image replaced)")
  return (f"{head}: no image-level guarantee (one brightness offset per image, eps=inf for "
          f"images); eps={report['protected_statistic_epsilon']:g} for mean brightness only")
