"""ScatterNet features computed once per image and kept in memory, when nothing varies per epoch.

The scattering transform is fixed and data-independent: without augmentation (and without
LDP noise) an image's features are the same at every step, so each split is scattered once,
in evaluation-sized batches, and the steps read float features instead of uint8 images. The
model is the same (`precomputed_features=True` skips its scattering); only where the
transform runs changes. A split whose features would not fit in `MAX_CACHE_BYTES` is not
cached (the run scatters on the fly, as with augmentation).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpjax import models

MAX_CACHE_BYTES = 4 << 30  # All three splits together, float32.


def wanted(config) -> bool:
  """Whether `config` asks for cached features and nothing makes them vary between steps."""
  return (config.arch in models.SCATTERNET_ARCHITECTURES and config.cache_features and not config.augment
          and config.mech != 'ldp')


class FeatureSplit:
  """A split whose `gather` returns float32 scattering features in place of uint8 images."""

  def __init__(self, split, features: np.ndarray):
    self._split = split
    self.features = features

  def gather(self, indices):
    indices = np.asarray(indices, np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
      raise IndexError(f'Expected indices in [0, {len(self)}) for split {self.name!r}')
    return self.features[indices], self._split.labels[indices], self._split.ids[indices]

  def __len__(self) -> int:
    return len(self._split)

  def __getattr__(self, name: str) -> Any:  # labels, ids, patients, stable_ids, units(), name
    return getattr(self._split, name)


def feature_shape(model, image_size: int) -> tuple[int, ...]:
  """Shape of one image's features under `model`, ``(1, h, w, channels)``."""
  return tuple(jax.eval_shape(
      lambda x: models.scattering_features(model, x),
      jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)).shape)


def feature_bytes(data, model) -> int:
  """float32 bytes of the features of every split of `data` under `model`."""
  per_image = int(np.prod(feature_shape(model, data.image_size)))
  return 4 * per_image * sum(len(s) for s in (data.train, data.val, data.test))


def cache_splits(data, model, prepare_images, batch_size: int):
  """`data` with train/val/test replaced by FeatureSplits of `model`'s scattering features.

  `prepare_images(uint8) -> model input` is the run's evaluation-mode preprocessing (centre
  crop, normalisation), so the features are exactly what the model computes from images.
  """
  features_of = jax.jit(lambda images: models.scattering_features(model, prepare_images(images)))

  def split_features(split):
    parts = []
    for start in range(0, len(split), batch_size):
      rows = np.arange(start, min(start + batch_size, len(split)))
      images, _, _ = split.gather(rows)
      parts.append(np.asarray(features_of(jnp.asarray(images))))
    return np.concatenate(parts) if parts else np.zeros((0,), np.float32)

  return dataclasses.replace(data, **{name: FeatureSplit(split, split_features(split))
                                      for name, split in (('train', data.train),
                                                          ('val', data.val),
                                                          ('test', data.test))})
