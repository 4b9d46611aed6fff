"""Local differential privacy on training images: Laplace noise drawn once per example.

The paper ("Benchmarking Differentially Private Residual Networks for Medical Imagery") released
one noisy copy of each training image. Two mechanisms live here:

* `laplace_perturb`: i.i.d. Laplace(0, beta) on every pixel value of a [0, 1] image, as the
  paper's text describes. Grey images (chest X-rays, stored as three equal RGB channels) take
  `grayscale=True`: ONE Laplace value per grey pixel, copied to the three channels. Noising the
  three copies independently would release each grey pixel three times (an attacker averages
  the channels and divides the noise variance by 3): its cost would be 3/beta, not 1/beta.
* `brightness_shift`: what the paper's released code did: ONE Laplace value per image added to
  every pixel. It is a brightness shift and gives no image-level guarantee.

Both key the noise on a stable example id, so an example receives the same noise in every
epoch (re-drawing it each epoch would release several noisy copies and compose the privacy
loss). Only training images are perturbed; the trainer leaves the test set clean.

No single unqualified epsilon describes local DP on images: `ldp_epsilon_report` states each
epsilon together with the neighbouring relation it refers to.

>>> report = ldp_epsilon_report(1.0, (224, 224, 3))
>>> report['per_pixel_epsilon'], report['per_image_epsilon']
(1.0, 150528.0)
>>> grey = ldp_epsilon_report(1.0, (224, 224, 3), grayscale=True)  # One value per grey pixel.
>>> grey['per_pixel_epsilon'], grey['per_image_epsilon']
(1.0, 50176.0)
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

VARIANTS = ('laplace', 'paper_brightness')

PER_PIXEL_RELATION = ('one pixel value of one image replaced by any other value in [0, 1], '
                      'all other pixel values fixed')
GREY_PER_PIXEL_RELATION = ('one grey pixel of one image (its value, shared by all channels) '
                           'replaced by any other value in [0, 1], all other pixels fixed')
PER_IMAGE_RELATION = ('one image replaced by any other image of the same shape, pixel values '
                      'in [0, 1] (replace-one-record local DP)')
BRIGHTNESS_RELATION = ('two images that differ only by a uniform offset c added to every pixel '
                       'value, |c| <= 1 on the [0, 1] scale (i.e. only in mean brightness)')


def _check_beta(beta) -> None:
  """Validates beta when it is a concrete number; traced values are checked by the caller."""
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


def laplace_noise(key: jax.Array, shape: Sequence[int], beta, example_ids: jax.Array,
                  dtype=jnp.float32, *, grayscale: bool = False) -> jax.Array:
  """Unclipped Laplace(0, beta) noise for images of `shape` [N, ...], keyed on `example_ids`.

  With `grayscale=False` the noise has `shape`: one value per pixel value. With
  `grayscale=True` (`shape` = [N, H, W, C]) it has shape [N, H, W, 1]: one value per grey pixel,
  which `laplace_perturb(..., grayscale=True)` adds to the grey image and copies to the C
  channels.

  Row i is drawn from `fold_in(key, example_ids[i])`, as in `laplace_perturb`.

  Internal building block of `laplace_perturb`, exposed so its distribution can be tested.
  """
  shape = tuple(int(s) for s in shape)
  _check_beta(beta)
  _check_ids(shape, example_ids)
  if grayscale:
    _check_grayscale_shape(shape, 'a noise shape')
    shape = grey_noise_shape(shape)
  return _laplace_noise(key, shape, beta, example_ids, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=('shape', 'dtype'))
def _laplace_noise(key, shape, beta, example_ids, dtype):
  keys = _example_keys(key, example_ids)
  unit = jax.vmap(lambda k: jax.random.laplace(k, shape[1:], dtype))(keys)
  return unit * jnp.asarray(beta, dtype)


@functools.partial(jax.jit, static_argnames=('grayscale',))
def _laplace_perturb(key, images, beta, example_ids, grayscale=False):
  if not grayscale:
    noise = _laplace_noise(key, images.shape, beta, example_ids, images.dtype)
    return jnp.clip(images + noise, 0.0, 1.0)
  grey = jnp.mean(images, axis=-1, keepdims=True)  # Exact (up to rounding) for equal channels.
  noise = _laplace_noise(key, grey.shape, beta, example_ids, images.dtype)
  return jnp.broadcast_to(jnp.clip(grey + noise, 0.0, 1.0), images.shape)


def laplace_perturb(key: jax.Array, images: jax.Array, beta, example_ids: jax.Array, *,
                    grayscale: bool = False) -> jax.Array:
  """Adds i.i.d. Laplace(0, beta) noise to every pixel value (or grey pixel), then clips to [0, 1].

  Runs jitted on device. The noise of example i is drawn from `fold_in(key, example_ids[i])`,
  so with the same `key` an example gets the SAME noise in every epoch and whatever its
  position in the batch: the training set is released once, as in the paper. Apply it to
  training images only; the test set is not perturbed (as in the paper), which the trainer
  handles.

  Colour images (`grayscale=False`, e.g. APTOS fundus photographs): one Laplace value per pixel
  value, d = H*W*C values per image.

  Grey images stored as C equal channels (`grayscale=True`, chest X-rays fed to an RGB
  network): the grey value of each pixel is taken once (the mean over the last, channel axis;
  for equal channels this is the grey value itself), ONE Laplace value is added per grey pixel
  (noise shape [N, H, W, 1]), the result is clipped and copied to all C channels, which are
  therefore identical in the release. d = H*W values per image. Noising the C copies of a grey
  pixel independently instead (`grayscale=False` on a grey image) releases that pixel C times:
  averaging the channels divides the noise variance by C, and the cost is C/beta per pixel
  (3/beta for RGB), not 1/beta. Given a colour image, `grayscale=True` releases its channel
  mean (a grey version), with the same guarantees.

  Formal guarantees:
    Per pixel value (colour) / per grey pixel (grey): epsilon = 1/beta (pure, delta = 0) under
    the relation "one pixel value (grey: one grey pixel, i.e. all its channels) replaced by any
    other value in [0, 1], all others fixed" (sensitivity 1 on [0, 1]; a grey pixel is the mean
    of its channels, so it moves by at most 1 too).
    Per image of d noised values (colour: d = H*W*C, e.g. 224*224*3 = 150,528; grey:
    d = H*W, e.g. 224*224 = 50,176): epsilon = d/beta under "one image replaced by any other
    image" (replace-one-record local DP), by composition over the d values; this bound is
    tight for the L1 distance d between an all-black and an all-white image. Clipping and
    copying the grey value to the channels are post-processing and cost nothing.
    Using a different key, or a different id for the same image, releases a second noisy copy
    and the epsilons add up.

  Args:
    key: the run's LDP key (the same one every epoch).
    images: float array [N, ...] (e.g. NHWC) with values in [0, 1]; with `grayscale=True`,
      exactly [N, H, W, C] (channel axis last).
    beta: Laplace scale on the [0, 1] scale (> 0).
    example_ids: int array [N], a stable id per example.
    grayscale: the images are grey (C equal channels): one noise value per grey pixel.

  Returns:
    The perturbed images, same shape and dtype, values in [0, 1].
  """
  _check_images(images)
  _check_beta(beta)
  _check_ids(jnp.shape(images), example_ids)
  if grayscale:
    _check_grayscale_shape(jnp.shape(images), 'images')
  return _laplace_perturb(key, images, beta, example_ids, grayscale=bool(grayscale))


def brightness_offsets(key: jax.Array, beta, example_ids: jax.Array,
                       dtype=jnp.float32) -> jax.Array:
  """Unclipped per-image offsets [N] of `brightness_shift`, Laplace(0, beta) on the [0, 1] scale.

  Internal building block, exposed so its distribution can be tested.
  """
  _check_beta(beta)
  _check_ids(jnp.shape(example_ids), example_ids)
  return _brightness_offsets(key, beta, example_ids, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=('dtype',))
def _brightness_offsets(key, beta, example_ids, dtype):
  keys = _example_keys(key, example_ids)
  unit = jax.vmap(lambda k: jax.random.laplace(k, (), dtype))(keys)
  return unit * jnp.asarray(beta, dtype)


@jax.jit
def _brightness_shift(key, images, beta, example_ids):
  offsets = _brightness_offsets(key, beta, example_ids, images.dtype)
  offsets = offsets.reshape((-1,) + (1,) * (images.ndim - 1))
  return jnp.clip(images + offsets, 0.0, 1.0)


def brightness_shift(key: jax.Array, images: jax.Array, beta, example_ids: jax.Array) -> jax.Array:
  """The paper's released-code "LDP": one Laplace value per image added to all pixels, clipped.

  The original code drew `np.random.laplace(0, 255 / eps, 1)` with eps = 1/beta, i.e. one
  Laplace(0, 255*beta) value on the [0, 255] scale, and added it to every pixel. Here that is
  one Laplace(0, beta) value on the [0, 1] scale, added to every pixel value of the image and
  clipped to [0, 1]. Noise is keyed on the example id, identical in every epoch. Training
  images only; the test set is not perturbed.

  Formal guarantees:
    NONE at the image level (nor at the pixel level). The shift leaves every difference
    between two pixel values of the image unchanged, so two images that differ in anything
    other than a uniform offset are told apart with certainty (epsilon = infinity). What it
    does protect: the image's mean brightness, with epsilon = 1/beta, under the relation "two
    images that differ only by a uniform offset c, |c| <= 1". Kept to reproduce the paper.

  Args and Returns: as `laplace_perturb`.
  """
  _check_images(images)
  _check_beta(beta)
  _check_ids(jnp.shape(images), example_ids)
  return _brightness_shift(key, images, beta, example_ids)


PERTURBATIONS: dict[str, Callable[..., jax.Array]] = {
    'laplace': laplace_perturb,
    'paper_brightness': brightness_shift,
}


def ldp_epsilon_report(beta: float, image_shape: Sequence[int], variant: str = 'laplace', *,
                       grayscale: bool = False) -> dict[str, Any]:
  """The local-DP epsilons of one released image, each with the relation it refers to.

  Args:
    beta: Laplace scale on the [0, 1] scale.
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
    (delta = 0) and hold per example for one release; they are not DP-SGD epsilons.
  """
  if variant not in VARIANTS:
    raise ValueError(f'Expected variant in {VARIANTS}, got {variant!r}')
  beta = float(beta)
  _check_beta(beta)
  image_shape = tuple(int(s) for s in image_shape)
  if not image_shape or min(image_shape) < 1:
    raise ValueError(f'Expected a non-empty image_shape of positive sizes, got {image_shape}')
  grayscale = bool(grayscale)
  if grayscale and len(image_shape) != 3:
    raise ValueError(f'Expected an image_shape [H, W, C] with a trailing channel axis with '
                     f'grayscale=True, got {image_shape}')
  num_values = math.prod(image_shape[:-1]) if grayscale else math.prod(image_shape)
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
        per_pixel_epsilon=1.0 / beta,
        per_image_epsilon=num_values / beta,
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
            f'{channels / beta:g} per pixel.'),
    )
  elif variant == 'laplace':
    report.update(
        per_pixel_epsilon=1.0 / beta,
        per_image_epsilon=num_values / beta,
        guarantee=(f'epsilon = 1/beta = {1.0 / beta:g} per pixel value; '
                   f'epsilon = d/beta = {num_values / beta:g} per image'),
        explanation=(
            f'Laplace(0, {beta:g}) noise on each of the d = {num_values} pixel values in [0, 1] '
            '(sensitivity 1 each) gives epsilon = 1/beta for one value; an image is d such '
            'values, so by composition epsilon = d/beta when the whole image may change. '
            'Clipping to [0, 1] is post-processing.'),
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
            f'brightness is protected, with epsilon = 1/beta = {1.0 / beta:g}.'),
        protected_statistic='mean brightness (a uniform offset of all pixel values)',
        protected_statistic_epsilon=1.0 / beta,
        protected_statistic_relation=BRIGHTNESS_RELATION,
    )
  return report


def format_ldp_epsilon(report: dict[str, Any]) -> str:
  """One line for printed summaries, e.g. 'LDP laplace beta=1: eps=1 per pixel value, ...'.

  Grey reports say 'per pixel (one grey pixel changed)' and '... grey image'.
  """
  shape = 'x'.join(str(s) for s in report['image_shape'])
  head = f"LDP {report['variant']} beta={report['beta']:g}"
  if report['per_image_epsilon'] is not None:
    if report.get('grayscale', False):  # Reports written before the field existed: colour.
      return (f"{head}: eps={report['per_pixel_epsilon']:g} per pixel (one grey pixel changed), "
              f"eps={report['per_image_epsilon']:g} per {shape} grey image (image replaced)")
    return (f"{head}: eps={report['per_pixel_epsilon']:g} per pixel value (one value changed), "
            f"eps={report['per_image_epsilon']:g} per {shape} image (image replaced)")
  return (f"{head}: no image-level guarantee (one brightness offset per image, eps=inf for "
          f"images); eps={report['protected_statistic_epsilon']:g} for mean brightness only")
