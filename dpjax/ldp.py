"""Local differential privacy on training images: Laplace noise drawn once per example.

The paper ("Benchmarking Differentially Private Residual Networks for Medical Imagery") released
one noisy copy of each training image. Two mechanisms live here:

* `laplace_perturb`: i.i.d. Laplace(0, beta) on every pixel value of a [0, 1] image, as the
  paper's text describes.
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
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

VARIANTS = ('laplace', 'paper_brightness')

PER_PIXEL_RELATION = ('one pixel value of one image replaced by any other value in [0, 1], '
                      'all other pixel values fixed')
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


def _example_keys(key: jax.Array, example_ids: jax.Array) -> jax.Array:
  # The key depends on the id only, never on the position in the batch or on the step.
  return jax.vmap(lambda example_id: jax.random.fold_in(key, example_id))(example_ids)


def laplace_noise(key: jax.Array, shape: Sequence[int], beta, example_ids: jax.Array,
                  dtype=jnp.float32) -> jax.Array:
  """Unclipped Laplace(0, beta) noise of `shape` = [N, ...], row i keyed on `example_ids[i]`.

  Internal building block of `laplace_perturb`, exposed so its distribution can be tested.
  """
  shape = tuple(int(s) for s in shape)
  _check_beta(beta)
  _check_ids(shape, example_ids)
  return _laplace_noise(key, shape, beta, example_ids, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=('shape', 'dtype'))
def _laplace_noise(key, shape, beta, example_ids, dtype):
  keys = _example_keys(key, example_ids)
  unit = jax.vmap(lambda k: jax.random.laplace(k, shape[1:], dtype))(keys)
  return unit * jnp.asarray(beta, dtype)


@jax.jit
def _laplace_perturb(key, images, beta, example_ids):
  noise = _laplace_noise(key, images.shape, beta, example_ids, images.dtype)
  return jnp.clip(images + noise, 0.0, 1.0)


def laplace_perturb(key: jax.Array, images: jax.Array, beta, example_ids: jax.Array) -> jax.Array:
  """Adds i.i.d. Laplace(0, beta) noise to every pixel value, then clips to [0, 1].

  Runs jitted on device. The noise of example i is drawn from `fold_in(key, example_ids[i])`,
  so with the same `key` an example gets the SAME noise in every epoch and whatever its
  position in the batch: the training set is released once, as in the paper. Apply it to
  training images only; the test set is not perturbed (as in the paper), which the trainer
  handles.

  Formal guarantees:
    Per pixel value: epsilon = 1/beta (pure, delta = 0) under the relation "one pixel value
    replaced by any other value in [0, 1], all others fixed" (sensitivity 1 on [0, 1]).
    Per image of d pixel values (d = prod(images.shape[1:]), e.g. 224*224*3 = 150,528):
    epsilon = d/beta under "one image replaced by any other image" (replace-one-record local
    DP), by composition over the d values; this bound is tight for the L1 distance d between
    an all-black and an all-white image. Clipping is post-processing and costs nothing.
    Using a different key, or a different id for the same image, releases a second noisy copy
    and the epsilons add up.

  Args:
    key: the run's LDP key (the same one every epoch).
    images: float array [N, ...] (e.g. NHWC) with values in [0, 1].
    beta: Laplace scale on the [0, 1] scale (> 0).
    example_ids: int array [N], a stable id per example.

  Returns:
    The perturbed images, same shape and dtype, values in [0, 1].
  """
  _check_images(images)
  _check_beta(beta)
  _check_ids(jnp.shape(images), example_ids)
  return _laplace_perturb(key, images, beta, example_ids)


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


def ldp_epsilon_report(beta: float, image_shape: Sequence[int],
                       variant: str = 'laplace') -> dict[str, Any]:
  """The local-DP epsilons of one released image, each with the relation it refers to.

  Args:
    beta: Laplace scale on the [0, 1] scale.
    image_shape: shape of ONE perturbed image (e.g. (256, 256, 3)); d = prod(image_shape) is
      the number of pixel values that receive noise.
    variant: 'laplace' (per-pixel noise) or 'paper_brightness' (one offset per image).

  Returns:
    A JSON-friendly dict: `variant`, `beta`, `image_shape`, `num_pixel_values` (d),
    `per_pixel_epsilon` / `per_pixel_relation`, `per_image_epsilon` / `per_image_relation`,
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
  num_values = math.prod(image_shape)
  report = {
      'variant': variant,
      'beta': beta,
      'image_shape': list(image_shape),
      'num_pixel_values': num_values,
      'per_pixel_relation': PER_PIXEL_RELATION,
      'per_image_relation': PER_IMAGE_RELATION,
      'protected_statistic': None,
      'protected_statistic_epsilon': None,
      'protected_statistic_relation': None,
  }
  if variant == 'laplace':
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
  """One line for printed summaries, e.g. 'LDP laplace beta=1: eps=1 per pixel value, ...'."""
  shape = 'x'.join(str(s) for s in report['image_shape'])
  head = f"LDP {report['variant']} beta={report['beta']:g}"
  if report['per_image_epsilon'] is not None:
    return (f"{head}: eps={report['per_pixel_epsilon']:g} per pixel value (one value changed), "
            f"eps={report['per_image_epsilon']:g} per {shape} image (image replaced)")
  return (f"{head}: no image-level guarantee (one brightness offset per image, eps=inf for "
          f"images); eps={report['protected_statistic_epsilon']:g} for mean brightness only")
