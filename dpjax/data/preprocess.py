"""On-device image preprocessing: pure JAX, jit-able, batched (NHWC).

The training pipeline is ``to_unit_float`` -> (local-DP perturbation of the [0, 1] image,
training only) -> ``center_crop`` or ``random_affine`` -> ``normalize``. The steps are
separate functions so that LDP noise can act on the full [0, 1] image before cropping.

>>> import jax.numpy as jnp
>>> images = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.uint8).reshape(2, 4, 4, 3)
>>> center_crop(images, 2).shape
(2, 2, 2, 3)
>>> float(to_unit_float(jnp.full((1,), 255, jnp.uint8))[0])
1.0
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# torchvision's ImageNet statistics (what the pretrained ResNet-18 expects), RGB order.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_unit_float(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [0, 1] (x / 255, like torchvision's ToTensor)."""
  return images.astype(jnp.float32) / 255.0


def _crop_origin(full: int, size: int) -> int:
  if size > full:
    raise ValueError(f'Expected crop {size=} <= image side {full}')
  return int(round((full - size) / 2.0))  # torchvision CenterCrop's rounding.


def center_crop(images: jax.Array, size: int) -> jax.Array:
  """Central ``size`` x ``size`` window of NHWC images (torchvision CenterCrop offsets)."""
  top = _crop_origin(images.shape[1], size)
  left = _crop_origin(images.shape[2], size)
  return images[:, top:top + size, left:left + size, :]


def normalize(images01: jax.Array) -> jax.Array:
  """(x - mean) / std per channel with ImageNet statistics; input in [0, 1]."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (images01 - mean) / std


def _interpolation_weights(source: jax.Array, valid_size: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Linear interpolation along one axis: indices i0, i0+1 (clipped) and their weights.

  Neighbours outside [0, valid_size) get weight 0 (zero padding, torchvision's fill=0).
  """
  i0 = jnp.floor(source)
  frac = source - i0
  i0 = i0.astype(jnp.int32)
  i1 = i0 + 1
  w0 = jnp.where((i0 >= 0) & (i0 < valid_size), 1.0 - frac, 0.0)
  w1 = jnp.where((i1 >= 0) & (i1 < valid_size), frac, 0.0)
  return jnp.clip(i0, 0, valid_size - 1), jnp.clip(i1, 0, valid_size - 1), w0, w1


def _affine_one(image: jax.Array, size: int, scale: jax.Array, shift_y: jax.Array, shift_x: jax.Array) -> jax.Array:
  """Scales the centre crop about its centre and shifts it (pixels); bilinear, zero fill."""
  crop = center_crop(image[None], size)[0].astype(jnp.float32)
  centre = (size - 1) / 2.0
  coords = jnp.arange(size, dtype=jnp.float32)
  # Inverse map: output pixel p shows the crop at centre + (p - shift - centre) / scale.
  rows = centre + (coords - shift_y - centre) / scale
  cols = centre + (coords - shift_x - centre) / scale
  r0, r1, wr0, wr1 = _interpolation_weights(rows, size)
  c0, c1, wc0, wc1 = _interpolation_weights(cols, size)
  # Separable: no rotation or shear, so interpolate rows, then columns.
  by_rows = crop[r0] * wr0[:, None, None] + crop[r1] * wr1[:, None, None]
  return by_rows[:, c0] * wc0[None, :, None] + by_rows[:, c1] * wc1[None, :, None]


def random_affine(key: jax.Array, images: jax.Array, size: int, max_translate: float = 0.1,
                  max_scale: float = 1.1, max_translate_x: float = 0.0, *,
                  example_ids: jax.Array | None = None) -> jax.Array:
  """The paper's ``RandomAffine(degrees=0, translate=(0, 0.1), scale=(1, 1.1))`` on the centre crop.

  Like the paper's pipeline (Resize -> CenterCrop -> RandomAffine), each image is centre
  cropped to ``size`` and then, independently per example, scaled about the crop centre by
  s ~ U[1, max_scale] and shifted by a whole number of pixels: vertically by
  round(U[-max_translate, max_translate] * size) and horizontally by
  round(U[-max_translate_x, max_translate_x] * size). (torchvision reads translate=(a, b) as
  horizontal fraction a, vertical fraction b, so the paper's (0, 0.1) shifts vertically only.)
  Sampling is bilinear (torchvision's default is nearest); uncovered pixels are 0.
  With max_translate = max_translate_x = 0 and max_scale = 1 this equals ``center_crop`` exactly.

  Args:
    key: PRNG key; example i uses an independent draw.
    images: [N, H, W, C] with H, W >= size (uint8 or float).
    size: output side.
    example_ids: optional uint32/int32 [N]: example i then draws from ``fold_in(key, id_i)``,
      so its transform depends on its own id only, never on its row in the batch. Use ids
      that do not change when other examples are added or removed (DP-SGD: otherwise adding
      one example would move every later example's public transform, and one example could
      change the clipped sum by more than C).

  Returns:
    float32 [N, size, size, C].
  """
  if max_scale < 1 or max_translate < 0 or max_translate_x < 0:
    raise ValueError(f'Expected {max_scale=} >= 1, {max_translate=} >= 0, {max_translate_x=} >= 0')
  num = images.shape[0]

  def draw(draw_key, shape):
    scale_key, y_key, x_key = jax.random.split(draw_key, 3)
    scales = jax.random.uniform(scale_key, shape, minval=1.0, maxval=max_scale)
    shift_y = jnp.round(jax.random.uniform(y_key, shape, minval=-max_translate, maxval=max_translate) * size)
    shift_x = jnp.round(jax.random.uniform(x_key, shape, minval=-max_translate_x, maxval=max_translate_x) * size)
    return scales, shift_y, shift_x

  if example_ids is None:
    scales, shift_y, shift_x = draw(key, (num,))
  else:
    scales, shift_y, shift_x = jax.vmap(lambda i: draw(jax.random.fold_in(key, i), ()))(example_ids)
  return jax.vmap(_affine_one, in_axes=(0, None, 0, 0, 0))(images, size, scales, shift_y, shift_x)
