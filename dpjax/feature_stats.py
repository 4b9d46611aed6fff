"""Private per-channel mean and variance of feature maps, for data normalisation.

A fixed (public, never trained on the private data) feature extractor such as a ScatterNet
gives features whose scale varies by orders of magnitude across channels; DP-SGD on them
learns far better once they are normalised (Tramer & Boneh 2021, "DataNorm"). The mean and
variance are statistics of the private data, so they are released with the Gaussian
mechanism and their cost enters the same ledger as the training steps.

Each privacy unit u (a patient, say, with one or more images) contributes one vector: the
MEAN over its images of ``v(x) = concat(spatial mean of x, spatial mean of x**2)`` (per
channel), plus, when the number of units is not public, a constant count coordinate. That
vector is clipped to L2 norm <= C, the clipped vectors are summed, and N(0, (zC)^2 I) is
added. Adding or removing one unit moves the sum by at most C, however many images the unit
has, so the release is ``GaussianDpEvent(z)`` under add/remove-one of a unit. Then
``mean = S1 / n`` and ``var = max(S2 / n - mean**2, var_floor)`` are post-processing.

Unlike the reference code (ftramer/Handcrafted-DP), the mean and second moment are clipped
jointly with a fixed, data-independent clip norm (no median of the private norms), so the
whole release is one Gaussian mechanism.

>>> import numpy as np
>>> from dpjax import accounting, secret_keys
>>> features = np.random.default_rng(0).normal(2.0, 3.0, size=(500, 4, 4, 3))
>>> stats = private_feature_stats(
...     features, np.arange(500) // 2, l2_norm_clip=30.0, noise_multiplier=5.0,
...     key=secret_keys.fresh_secret_key(), expected_num_units=250)
>>> stats.mean.shape, stats.var.shape
((3,), (3,))
>>> ledger = accounting.PrivacyLedger('poisson')
>>> ledger.record_gaussian(stats.noise_multiplier, 'feature_stats')
"""

from __future__ import annotations

from collections.abc import Iterable
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpjax import hyperparameters


class FeatureStats(NamedTuple):
  """Privately estimated per-channel statistics, and what to record for them.

  Attributes:
    mean: [c] per-channel mean (float64).
    var: [c] per-channel variance, >= the ``var_floor`` used (float64).
    num_units: the denominator used: ``expected_num_units``, or the noisy (clip-weighted)
      count of units.
    noisy_sum: the released vector, [2c] (or [2c + 1] with the count coordinate): the
      clipped sum plus noise. Everything else here is computed from it.
    noise_multiplier: z; record ``ledger.record_gaussian(noise_multiplier, 'feature_stats')``.
    l2_norm_clip: C; the noise std was z * C.
  """

  mean: np.ndarray
  var: np.ndarray
  num_units: float
  noisy_sum: np.ndarray
  noise_multiplier: float
  l2_norm_clip: float


def _check_key(key: Any) -> jax.Array:
  """A typed JAX key (or legacy raw uint32[2] key data); never a seed."""
  if isinstance(key, (bool, int, np.bool_, np.integer)):
    raise TypeError(
        f'Expected key to be a secret JAX PRNG key, got {type(key).__name__} {key!r}: a seed '
        'lets anyone regenerate and subtract the noise. Use dpjax.secret_keys.fresh_secret_key()')
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f'Expected one key, got a key array of shape {key.shape}')
    return key
  data = np.asarray(key)
  if data.dtype != np.uint32 or data.shape != (2,):
    raise TypeError(
        'Expected key to be a secret JAX PRNG key (e.g. dpjax.secret_keys.fresh_secret_key()),'
        f' got {type(key).__name__} of dtype {data.dtype} and shape {data.shape}')
  return jax.random.wrap_key_data(data)


def _batches(features, unit_ids, mask) -> Iterable[tuple[Any, Any, Any]]:
  if isinstance(features, (np.ndarray, jax.Array)):
    if unit_ids is None:
      unit_ids = np.arange(features.shape[0]) if features.ndim else None
    yield features, unit_ids, mask
    return
  if unit_ids is not None or mask is not None:
    raise ValueError('With an iterable of batches, give unit_ids (and masks) in the batches: '
                     '(features, unit_ids) or (features, unit_ids, mask)')
  for batch in features:
    if not isinstance(batch, tuple) or len(batch) not in (2, 3):
      raise ValueError('Expected each batch to be a tuple (features, unit_ids) or '
                       f'(features, unit_ids, mask), got {type(batch).__name__}')
    yield batch if len(batch) == 3 else (*batch, None)


def _per_example_vectors(features) -> np.ndarray:
  """[n, ..., c] -> [n, 2c]: concat(mean of x, mean of x**2) over the middle axes."""
  x = np.asarray(features, np.float64)
  if x.ndim < 2:
    raise ValueError(f'Expected features of shape [n, ..., channels], got shape {x.shape}')
  axes = tuple(range(1, x.ndim - 1))
  with np.errstate(over='ignore', invalid='ignore'):
    return np.concatenate([x.mean(axis=axes), np.square(x).mean(axis=axes)], axis=-1)


def _unit_vectors(batches: Iterable[tuple[Any, Any, Any]]) -> np.ndarray:
  """[units, 2c]: per unit, the mean of its examples' vectors, over all batches."""
  rows: dict[Any, int] = {}
  id_kind = None
  sums = None
  counts = np.zeros(0)
  for features, unit_ids, mask in batches:
    vectors = _per_example_vectors(features)
    if sums is None:
      sums = np.zeros((0, vectors.shape[1]))
    elif vectors.shape[1] != sums.shape[1]:
      raise ValueError(f'Expected {sums.shape[1] // 2} channels in every batch, got '
                       f'{vectors.shape[1] // 2}')
    ids = np.asarray(unit_ids)
    if ids.shape != (len(vectors),):
      raise ValueError(f'Expected unit_ids of shape ({len(vectors)},), got {ids.shape}')
    # One unit must map to one row across batches: a NaN id (never equal to itself) or an id
    # that is 7 in one batch and '7' in another would split a unit and double its sensitivity.
    if ids.dtype.kind == 'f' and np.isnan(ids).any():
      raise ValueError('Expected unit_ids without NaN')
    if id_kind is None:
      id_kind = ids.dtype.kind if ids.dtype.kind not in 'iu' else 'i'
    elif (ids.dtype.kind if ids.dtype.kind not in 'iu' else 'i') != id_kind:
      raise ValueError(f'Expected unit_ids of one kind in every batch, got {id_kind!r} then '
                       f'{ids.dtype.kind!r}')
    if mask is not None:
      keep = np.asarray(mask)
      if keep.dtype != bool or keep.shape != ids.shape:
        raise ValueError(f'Expected a bool mask of shape {ids.shape}, got {keep.dtype} '
                         f'{keep.shape}')
      vectors, ids = vectors[keep], ids[keep]
    if not len(ids):
      continue
    unique, inverse = np.unique(ids, return_inverse=True)
    batch_rows = np.array([rows.setdefault(u.item(), len(rows)) for u in unique])
    if len(rows) > len(sums):
      grow = max(len(rows), 2 * len(sums)) - len(sums)
      sums = np.concatenate([sums, np.zeros((grow, sums.shape[1]))])
      counts = np.concatenate([counts, np.zeros(grow)])
    with np.errstate(over='ignore', invalid='ignore'):
      np.add.at(sums, batch_rows[inverse.reshape(-1)], vectors)
    np.add.at(counts, batch_rows[inverse.reshape(-1)], 1)
  if sums is None:
    raise ValueError('Expected at least one batch of features')
  used = len(rows)
  with np.errstate(over='ignore', invalid='ignore'):
    return sums[:used] / counts[:used, None]


# Float noise leaks through its low-order bits (Mironov, "On significance of the least
# significant bits for differential privacy", CCS 2012): float32 `jax.random.normal` takes
# only 2^23 values, so whoever knows the other units can tell which clipped sum the released
# value came from (a review reproduced it, 20 of 20). The noise is therefore drawn in float64
# (53-bit uniforms, NumPy's Philox keyed by the secret key) and the noisy sum snapped to a
# grid of SNAP_FRACTION x the noise std: far coarser than float64 spacing, far finer than the
# noise, so the released value carries no trace of the sum's low-order bits.
SNAP_FRACTION = 2.0**-20


def float64_normal(key: jax.Array, shape: tuple[int, ...]) -> np.ndarray:
  """Standard normal float64 draws from NumPy's Philox generator keyed by a JAX key."""
  words = np.asarray(jax.random.key_data(key), np.uint32).reshape(-1)
  seed = int.from_bytes(words.tobytes(), 'little')
  return np.random.Generator(np.random.Philox(key=seed)).standard_normal(shape)


def snap(values: np.ndarray, noise_std: float) -> np.ndarray:
  """`values` rounded to multiples of a power of two near SNAP_FRACTION * noise_std."""
  if noise_std <= 0:
    return values
  grid = 2.0 ** math.floor(math.log2(noise_std * SNAP_FRACTION))
  return np.round(values / grid) * grid


def _clip_rows(vectors: np.ndarray, l2_norm_clip: float) -> np.ndarray:
  """Each row scaled to L2 norm <= C; a row with a NaN or inf entry becomes 0 (its norm is
  then <= C too, so one bad unit cannot void the sensitivity bound)."""
  vectors = np.where(np.all(np.isfinite(vectors), axis=1, keepdims=True), vectors, 0.0)
  largest = np.max(np.abs(vectors), axis=1, keepdims=True, initial=0.0)
  safe = np.where(largest > 0, largest, 1.0)
  norms = safe * np.linalg.norm(vectors / safe, axis=1, keepdims=True)  # No overflow.
  scale = np.minimum(1.0, l2_norm_clip / np.where(norms > 0, norms, 1.0))
  return vectors * scale


def private_feature_stats(
    features,
    unit_ids=None,
    *,
    l2_norm_clip: float,
    noise_multiplier: float,
    key: jax.Array,
    expected_num_units: float | None = None,
    count_weight: float = 0.5,
    mask=None,
    var_floor: float = 1e-8,
) -> FeatureStats:
  """Per-channel mean and variance of per-example feature maps, with the Gaussian mechanism.

  Args:
    features: per-example features [n, ..., c] (e.g. [n, h, w, c]; the middle axes are
      averaged, so [n, c] is fine), as one NumPy or JAX array, or an iterable of batches
      ``(features, unit_ids)`` or ``(features, unit_ids, mask)`` for data that does not fit
      in memory (a unit may span batches; only a [units, 2c] table is kept).
    unit_ids: with one array: [n] privacy-unit ids (ints or strings; e.g. a patient id), the
      examples of a unit are clipped together. None: each example is its own unit.
    l2_norm_clip: C, finite and > 0: the bound on each unit's vector.
    noise_multiplier: z, finite and >= 0: the noise std is z * C per coordinate.
    key: a SECRET JAX key (:func:`dpjax.secret_keys.fresh_secret_key`) used only for this
      release; ints and bools (seeds) are refused.
    expected_num_units: the PUBLIC number of units to divide by (as DP-SGD divides by
      q * N). None: the count is released too, as a coordinate ``count_weight * C`` appended
      to each unit's vector before clipping; the denominator is then the noisy sum of that
      coordinate over ``count_weight * C`` (at least 1), which weights each unit by its clip
      factor, in the numerator and the denominator alike.
    count_weight: in (0, 1); only without ``expected_num_units``.
    mask: with one array: [n] bool, False for examples to ignore (padding).
    var_floor: >= 0; the variance is at least this (noise can make S2/n - mean**2 negative).

  Returns:
    :class:`FeatureStats`. Record the release before training:
    ``ledger.record_gaussian(stats.noise_multiplier, 'feature_stats')``.

  Formal guarantees:
    ``noisy_sum`` is the Gaussian mechanism with noise multiplier z on a sum whose L2
    sensitivity to adding or removing one privacy unit (all examples sharing a unit id) is
    C: each unit's vector, the mean over its examples of concat(per-channel mean of x,
    per-channel mean of x**2) (plus the count coordinate), is clipped to norm <= C (a
    non-finite vector is replaced by 0). So it is ``GaussianDpEvent(z)`` under add/remove
    one unit (replace-one: sensitivity 2C, which the ledger folds in for 'shuffled'); mean,
    var and num_units are post-processing of it and of the public ``expected_num_units``.
    Assumes: the key is secret and used for nothing else; the feature extractor does not
    depend on the private data; unit ids are the ledger's privacy units; and
    ``expected_num_units`` is public (not computed from the private data).

  The estimand is the unit-weighted statistic: each unit's images count as one unit (equal
  to the per-image mean and variance when every unit has one image). Clipping biases it:
  with a public count, clipped units shrink S1 and S2 towards 0; choose C above the norm of
  typical units (e.g. from public data or the features' known range).
  """
  l2_norm_clip = hyperparameters.concrete_scalar('l2_norm_clip', l2_norm_clip, minimum=0.0,
                                                 strictly_greater=True)
  if not (math.isfinite(l2_norm_clip) and l2_norm_clip > 0):
    raise ValueError(f'Expected {l2_norm_clip=} to be finite and > 0')
  noise_multiplier = hyperparameters.concrete_scalar('noise_multiplier', noise_multiplier,
                                                     minimum=0.0)
  key = _check_key(key)
  if expected_num_units is not None:
    expected_num_units = hyperparameters.concrete_scalar(
        'expected_num_units', expected_num_units, minimum=0.0, strictly_greater=True)
    if not (math.isfinite(expected_num_units) and expected_num_units > 0):
      raise ValueError(f'Expected {expected_num_units=} to be finite and > 0')
  count_weight = hyperparameters.concrete_scalar('count_weight', count_weight, minimum=0.0,
                                                 strictly_greater=True)
  if not 0 < count_weight < 1:
    raise ValueError(f'Expected 0 < {count_weight=} < 1')
  var_floor = hyperparameters.concrete_scalar('var_floor', var_floor, minimum=0.0)
  if not (math.isfinite(var_floor) and var_floor >= 0):
    raise ValueError(f'Expected {var_floor=} to be finite and >= 0')

  vectors = _unit_vectors(_batches(features, unit_ids, mask))
  count_coordinate = count_weight * l2_norm_clip
  if expected_num_units is None:
    vectors = np.concatenate([vectors, np.full((len(vectors), 1), count_coordinate)], axis=1)
  clipped_sum = _clip_rows(vectors, l2_norm_clip).sum(axis=0)
  noisy_sum = snap(clipped_sum + noise_multiplier * l2_norm_clip * float64_normal(
      key, clipped_sum.shape), noise_multiplier * l2_norm_clip)

  if expected_num_units is None:
    num_units = max(float(noisy_sum[-1]) / count_coordinate, 1.0)
  else:
    num_units = expected_num_units
  channels = (len(noisy_sum) - (expected_num_units is None)) // 2
  mean = noisy_sum[:channels] / num_units
  var = np.maximum(noisy_sum[channels:2 * channels] / num_units - mean**2, var_floor)
  return FeatureStats(mean, var, num_units, noisy_sum, noise_multiplier, l2_norm_clip)
