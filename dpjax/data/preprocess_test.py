"""Tests for on-device preprocessing: exact crops, identity augmentation, closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.data import preprocess


def _images(n=3, side=9, channels=3):
  return jnp.asarray(np.arange(n * side * side * channels).reshape(n, side, side, channels) % 251, jnp.uint8)


def test_to_unit_float_exact():
  x = jnp.asarray([0, 1, 128, 255], jnp.uint8)
  np.testing.assert_array_equal(preprocess.to_unit_float(x), np.float32([0, 1, 128, 255]) / np.float32(255))


def test_center_crop_exact_values():
  images = _images(side=9)
  out = preprocess.center_crop(images, 4)  # offset round(5 / 2) = 2, as torchvision
  np.testing.assert_array_equal(out, np.asarray(images)[:, 2:6, 2:6, :])
  np.testing.assert_array_equal(preprocess.center_crop(images, 9), images)
  with pytest.raises(ValueError, match='Expected crop size=10'):
    preprocess.center_crop(images, 10)


@pytest.mark.parametrize('use_jit', [False, True])
def test_random_affine_zero_range_is_center_crop(use_jit):
  images = preprocess.to_unit_float(_images(side=11))
  fn = lambda key, x: preprocess.random_affine(key, x, 7, max_translate=0.0, max_scale=1.0)
  fn = jax.jit(fn) if use_jit else fn
  out = fn(jax.random.key(0), images)
  np.testing.assert_array_equal(out, preprocess.center_crop(images, 7))


def test_random_affine_translation_is_whole_pixel_vertical_shift():
  images = preprocess.to_unit_float(_images(n=16, side=12))
  size = 10
  out = np.asarray(preprocess.random_affine(jax.random.key(1), images, size, max_translate=0.2, max_scale=1.0))
  crops = np.asarray(preprocess.center_crop(images, size))
  shifts = []
  for o, c in zip(out, crops):
    matches = []
    for s in range(-2, 3):  # round(U[-0.2, 0.2] * 10) in {-2..2}
      expected = np.zeros_like(c)
      if s >= 0:
        expected[s:] = c[:size - s]
      else:
        expected[:s] = c[-s:]
      if np.array_equal(o, expected):
        matches.append(s)
    assert len(matches) == 1
    shifts.append(matches[0])
  assert len(set(shifts)) >= 3  # independent per example


def test_random_affine_scale_keeps_centre_and_zooms():
  # A horizontal ramp: zooming by s about the centre scales the slope by 1/s and keeps the centre value.
  side, size = 21, 21
  ramp = np.tile(np.arange(side, dtype=np.float32)[None, :, None], (side, 1, 3))[None].repeat(8, 0)
  out = np.asarray(preprocess.random_affine(jax.random.key(2), jnp.asarray(ramp), size,
                                            max_translate=0.0, max_scale=1.1))
  centre = (size - 1) // 2
  np.testing.assert_allclose(out[:, centre, centre, 0], centre, atol=1e-5)
  slopes = out[:, centre, centre + 5, 0] - out[:, centre, centre + 4, 0]
  assert np.all(slopes <= 1 + 1e-6) and np.all(slopes >= 1 / 1.1 - 1e-6) and np.ptp(slopes) > 0.01


def test_normalize_closed_form():
  x = jnp.ones((2, 3, 3, 3), jnp.float32) * jnp.asarray([0.0, 0.5, 1.0])
  out = np.asarray(preprocess.normalize(x))
  expected = (np.float32([0.0, 0.5, 1.0]) - np.float32(preprocess.IMAGENET_MEAN)) / np.float32(preprocess.IMAGENET_STD)
  np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-6)
  np.testing.assert_allclose(out[0, 0, 0], [-2.117904, 0.196429, 2.64], atol=1e-5)


def test_random_affine_per_example_ids_ignore_the_row():
  # Keyed on ids, an example's transform is the same whatever else is in the batch and
  # wherever it sits: adding one example cannot move the others' (public) augmentation.
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 12, 12, 1)), jnp.float32)
  key, size = jax.random.key(3), 8
  ids = jnp.asarray([7, 11, 13], jnp.uint32)
  out = preprocess.random_affine(key, images, size, max_scale=1.3, example_ids=ids)
  shifted = preprocess.random_affine(key, jnp.concatenate([images[2:], images[:1]]), size,
                                     max_scale=1.3, example_ids=jnp.asarray([13, 7], jnp.uint32))
  np.testing.assert_array_equal(out[0], shifted[1])
  np.testing.assert_array_equal(out[2], shifted[0])
  other = preprocess.random_affine(key, images, size, max_scale=1.3,
                                   example_ids=jnp.asarray([8, 11, 13], jnp.uint32))
  assert not np.allclose(out[0], other[0])
