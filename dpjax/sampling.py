"""Batch selection with fixed shapes, randomness from explicit JAX keys only.

Both samplers give, for step t, int32 example indices padded to a fixed length
and a bool mask that is False on padding rows; one fixed shape means the jitted
train step compiles once. Use :meth:`PoissonSampler.batch` (or
:meth:`ShuffledSampler.batch`): it returns a :class:`PaddedBatch` whose
:meth:`~PaddedBatch.gather` fills padding rows with zeros, read from no example,
with NumPy and with ``jax.numpy`` alike, and whose mask goes to ``dp_sgd`` with
``dpjax.PerExampleGrads.from_batch(grads, batch)``.

``sample(t)`` still returns the bare ``(indices, mask)``. A padding row holds
``padding_index`` (= the number of examples), never a real example; NumPy
indexing with it raises IndexError, but ``jax.numpy`` indexing CLAMPS it to the
last example, and the once documented ``np.where(mask, indices, 0)`` copies
example 0 into every padding row: with a forgotten mask that example is then
counted once per padding row (sensitivity (1 + padding) * C instead of C). Prefer
the :class:`PaddedBatch`.

Which accounting event matches which sampler:

* :class:`PoissonSampler`: each unit (an example, or with ``units`` a group of
  examples such as one patient's images) independently with probability q;
  each step is ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` under
  add/remove-one-unit adjacency, i.e. ``PrivacyLedger('poisson')``.
* :class:`ShuffledSampler`: fixed-size batches from a fresh permutation each
  epoch (the paper's data loader); there is no amplification by sampling to
  claim, see ``PrivacyLedger('shuffled', steps_per_epoch=...)``.

The keys are private randomness: amplification by sampling assumes the
adversary does not know which examples were drawn. Derive them from secret
entropy (``dpjax`` runs do, see ``experiments``), never from a published seed;
integer seeds are refused. A sampler draws from
``dpjax.secret_keys.sampling_stream_key(key)``, a domain separate from the noise
of ``dp_sgd``, so the same key given to both yields unrelated streams.

>>> import jax, numpy as np
>>> sampler = PoissonSampler(jax.random.key(0),  # a test key: use a secret one
...                          num_examples=100, sampling_prob=0.1, multiple_of=8)
>>> indices, mask = sampler.sample(step=0)
>>> indices.shape == mask.shape == (sampler.capacity,)
True
>>> batch = sampler.batch(step=0)
>>> rows = batch.gather(np.arange(1.0, 101.0))  # padding rows are 0, not an example
>>> bool((rows[~batch.mask] == 0).all() and (rows[batch.mask] == batch.indices[batch.mask] + 1).all())
True
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from dpjax import secret_keys


def _round_up(value: int, multiple_of: int) -> int:
  return -(-value // multiple_of) * multiple_of


def _pad(indices: np.ndarray, length: int, padding_index: int) -> tuple[np.ndarray, np.ndarray]:
  padded = np.full((length,), padding_index, np.int32)
  padded[:len(indices)] = indices
  mask = np.zeros((length,), bool)
  mask[:len(indices)] = True
  return padded, mask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class PaddedBatch:
  """One step's batch: padded example indices, the mask of real rows, a safe gather.

  A pytree (``indices`` and ``mask`` are its leaves, ``num_examples`` is static), so it can
  be passed into a jitted train step and handed to ``dp_sgd`` with
  ``dpjax.PerExampleGrads.from_batch(grads, batch)``, which carries the mask.

  Attributes:
    indices: int32 ``[rows]``; padding rows hold ``num_examples`` (out of range).
    mask: bool ``[rows]``; False on padding rows.
    num_examples: the length of the data set the indices point into.

  Guarantee of :meth:`gather`: padding rows are zeros and depend on no example. If the
  mask is nevertheless forgotten, no example is counted more than once (an aliasing gather
  repeats one real example in every padding row: sensitivity (1 + padding) C). Forgetting
  the mask is still wrong: the number of padding rows is the capacity minus the realised
  batch size, so the gradients of those all-zero rows make the unmasked clipped sum move by
  up to 2C, not C, when one example is added or removed. Always pass the mask.
  """

  indices: jax.Array
  mask: jax.Array
  num_examples: int = dataclasses.field(metadata={'static': True})

  def gather(self, data):
    """The rows of ``data`` (an array or a pytree of arrays, example axis first, length
    ``num_examples``) for this batch; padding rows are zeros (False for bool arrays).

    NumPy data with a host batch is gathered on the host, reading the real rows only.
    Anything else (``jax.Array``, or inside ``jit``) uses ``jnp.take(mode='fill')`` with the
    padding rows forced out of range, so no real example is read for them either (plain
    ``jnp`` indexing would clamp the padding index to the last example).
    """
    return jax.tree.map(self._gather_array, data)

  def _gather_array(self, array):
    if np.shape(array)[:1] != (self.num_examples,):
      raise ValueError(f'PaddedBatch.gather: expected an array of {self.num_examples} examples '
                       f'(example axis first), got shape {np.shape(array)}: the indices point '
                       'into the data set the sampler was built for')
    if all(isinstance(x, np.ndarray) for x in (array, self.indices, self.mask)):
      mask = np.asarray(self.mask, bool)
      rows = np.zeros((len(mask), *array.shape[1:]), array.dtype)
      rows[mask] = array[self.indices[mask]]
      return rows
    # Out-of-range rows become fill_value: padding reads nothing, whatever its index says.
    safe = jnp.where(self.mask, self.indices, self.num_examples)
    return jnp.take(jnp.asarray(array), safe, axis=0, mode='fill', fill_value=0)


def _cpu_device():
  return jax.local_devices(backend='cpu')[0]  # This process's own: never another host's.


_BERNOULLI_BITS = 32


def exact_sampling_prob(sampling_prob: float) -> float:
  """The inclusion probability :class:`PoissonSampler` really uses for a requested q.

  Inclusion is decided by comparing 32 random bits with an integer threshold
  ``T = ceil(q * 2**32)``, so the probability is exactly ``T / 2**32``: at least q and
  less than q + 2**-32. Account with this value (the ledger then describes the sampler
  exactly, with no float rounding between what is sampled and what is charged).
  """
  if not 0 < sampling_prob <= 1:
    raise ValueError(f'Expected 0 < {sampling_prob=} <= 1')
  return _bernoulli_threshold(sampling_prob) / 2**_BERNOULLI_BITS


def _bernoulli_threshold(sampling_prob: float) -> int:
  # q * 2**32 is exact in float64 (a power-of-two scaling), so ceil is exact too.
  return min(math.ceil(sampling_prob * 2**_BERNOULLI_BITS), 2**_BERNOULLI_BITS)


def exact_bernoulli(key: jax.Array, sampling_prob: float, shape) -> jax.Array:
  """Bool array, each True independently with probability exactly
  :func:`exact_sampling_prob` ``(sampling_prob)`` (jit-compatible)."""
  threshold = _bernoulli_threshold(sampling_prob)
  if threshold >= 2**_BERNOULLI_BITS:
    return jnp.ones(shape, bool)
  return jax.random.bits(key, shape, jnp.uint32) < jnp.uint32(threshold)


class PoissonSampler:
  """Poisson sampling: each step includes each unit independently w.p. q.

  A unit is one example by default. With ``units`` (one array of example
  positions per unit, e.g. one patient's images), whole units are sampled and
  each sampled unit fills ``max_unit_size`` consecutive rows of the batch: its
  examples, or, when it has more, ``max_unit_size`` of them chosen uniformly at
  random (from secret randomness, independently per unit and step, whatever the
  examples contain), then padding. Clip each unit's summed gradient (e.g.
  ``dpjax.ghost_clipped_grad_sum(..., group_size=max_unit_size)``) and the
  guarantee is per unit.

  The realised batch size is random (Binomial(U, q) units), so batches are padded
  to a fixed ``capacity`` of units (default: expected size + 6 standard
  deviations, rounded up to ``multiple_of``). If a step ever draws more units
  than the capacity (probability below about 1e-9 per step at the default), the
  capacity GROWS to fit: units are never dropped, since dropping would make the
  batches no longer Poisson and the accounting wrong. Growth costs one
  recompilation; it is logged and counted in ``num_capacity_overflows``.

  Inclusion compares 32 random bits with an integer threshold, so the rate is
  exactly :attr:`sampling_prob` (= :func:`exact_sampling_prob` of the request),
  not a float approximation of it.

  Accounting: ``PoissonSampledDpEvent(sampling_prob, GaussianDpEvent(z))`` per
  step, add/remove-one-unit adjacency (``PrivacyLedger('poisson')``). Normalise
  by ``expected_batch_size`` (q * number of units), not the realised size.

  The key must be secret: whoever knows it knows every batch, and sampling then
  amplifies nothing. Integer seeds are refused; the sampler draws from
  ``secret_keys.sampling_stream_key(key)`` (separate from the noise domain).

  Attributes:
    capacity: current padded batch length in units (rows: ``capacity *
      max_unit_size``).
    num_capacity_overflows: how many sampled steps exceeded the capacity.
  """

  def __init__(self, key: jax.Array, num_examples: int, sampling_prob: float,
               capacity: int | None = None, multiple_of: int = 1, *,
               units: list[np.ndarray] | None = None, max_unit_size: int = 1):
    if num_examples < 1:
      raise ValueError(f'Expected {num_examples=} >= 1')
    if not 0 < sampling_prob <= 1:
      raise ValueError(f'Expected 0 < {sampling_prob=} <= 1')
    if multiple_of < 1:
      raise ValueError(f'Expected {multiple_of=} >= 1')
    if max_unit_size < 1:
      raise ValueError(f'Expected {max_unit_size=} >= 1')
    if units is not None:
      units = [np.asarray(u, np.int32).reshape(-1) for u in units]
      flat = np.concatenate(units) if units else np.zeros((0,), np.int32)
      if (not units or min(map(len, units)) < 1 or len(np.unique(flat)) != len(flat)
          or flat.min() < 0 or flat.max() >= num_examples):
        raise ValueError('Expected units: non-empty, disjoint arrays of positions in '
                         f'[0, {num_examples})')
    elif max_unit_size != 1:
      raise ValueError('max_unit_size only applies with units')
    self.key = secret_keys.as_secret_key(key, what='PoissonSampler key')
    self._stream = secret_keys.sampling_stream_key(self.key)
    self.num_examples = int(num_examples)
    self.units = units
    self.max_unit_size = int(max_unit_size)
    self.requested_sampling_prob = float(sampling_prob)
    self.sampling_prob = exact_sampling_prob(sampling_prob)
    self.multiple_of = int(multiple_of)
    if capacity is None:
      std = math.sqrt(self.num_units * self.sampling_prob * (1 - self.sampling_prob))
      capacity = min(math.ceil(self.expected_batch_size + 6 * std), self.num_units)
    if capacity < 1:
      raise ValueError(f'Expected {capacity=} >= 1')
    self.capacity = _round_up(int(capacity), self.multiple_of)
    self.num_capacity_overflows = 0

  @property
  def padding_index(self) -> int:
    """The index of padding rows: out of range, never a real example."""
    return self.num_examples

  @property
  def num_units(self) -> int:
    return self.num_examples if self.units is None else len(self.units)

  @property
  def expected_batch_size(self) -> float:
    """q * number of units, the constant DP-SGD divides the noisy sum by."""
    return self.sampling_prob * self.num_units

  def _step_key(self, step: int, purpose: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(self._stream, step), purpose)

  def inclusion(self, step: int) -> np.ndarray:
    """Bool ``[num_units]``: which units step ``step`` includes."""
    with jax.default_device(_cpu_device()):
      included = exact_bernoulli(self._step_key(step, 0), self.requested_sampling_prob,
                                 (self.num_units,))
    return np.asarray(included)

  def _chosen_members(self, step: int, sampled: np.ndarray) -> list[np.ndarray]:
    """Each sampled unit's examples, at most max_unit_size of them, chosen at random."""
    members = [self.units[u] for u in sampled]
    crowded = [i for i, m in enumerate(members) if len(m) > self.max_unit_size]
    if crowded:
      longest = max(len(members[i]) for i in crowded)
      choice_key = self._step_key(step, 1)
      with jax.default_device(_cpu_device()):
        # One key per unit: a unit's choice never depends on which other units were sampled.
        ranks = np.asarray(jax.vmap(lambda u: jax.random.bits(
            jax.random.fold_in(choice_key, u), (longest,), np.uint32))(
                np.asarray(sampled[crowded], np.int32)))
      for row, i in enumerate(crowded):
        order = np.argsort(ranks[row, :len(members[i])], kind='stable')
        members[i] = np.sort(members[i][order[:self.max_unit_size]])
    return members

  def sample(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(indices, mask)`` of length ``capacity * max_unit_size``.

    Deterministic in (key, step) apart from the padding length, which only grows.
    Padding rows hold ``padding_index``; gather with :meth:`batch` instead, whose
    :meth:`PaddedBatch.gather` is safe with ``jax.numpy`` too.
    """
    sampled = np.flatnonzero(self.inclusion(step)).astype(np.int32)
    if len(sampled) > self.capacity:
      new_capacity = _round_up(len(sampled), self.multiple_of)
      # The realised size is private: the message says only that the capacity grew.
      logging.warning('PoissonSampler: a sampled batch exceeded the capacity; growing it (one'
                      ' recompilation, nothing dropped).')
      self.capacity = new_capacity
      self.num_capacity_overflows += 1
    if self.units is None:
      return _pad(sampled, self.capacity, self.padding_index)
    slots = self.max_unit_size
    indices = np.full((self.capacity, slots), self.padding_index, np.int32)
    mask = np.zeros((self.capacity, slots), bool)
    for row, chosen in enumerate(self._chosen_members(step, sampled)):
      indices[row, :len(chosen)] = chosen
      mask[row, :len(chosen)] = True
    return indices.reshape(-1), mask.reshape(-1)

  def batch(self, step: int) -> PaddedBatch:
    """:meth:`sample` as a :class:`PaddedBatch` (same indices and mask)."""
    indices, mask = self.sample(step)
    return PaddedBatch(indices, mask, self.num_examples)


class ShuffledSampler:
  """Fixed-size batches from a fresh random permutation each epoch.

  This is what the paper's PyTorch ``DataLoader(shuffle=True)`` does: epoch
  e uses a fresh permutation (drawn from ``fold_in(sampling_stream_key(key), e)``)
  cut into consecutive batches of ``batch_size``. With ``drop_last=False`` every example appears
  exactly once per epoch (the short last batch is padded and masked); with
  ``drop_last=True`` the remainder is skipped.

  Accounting: each example is in at most one batch per epoch, and no
  amplification by sampling is claimed. Under replace-one adjacency each
  epoch is one Gaussian mechanism with sensitivity 2C, which
  ``PrivacyLedger('shuffled', steps_per_epoch=sampler.steps_per_epoch)``
  records. It does NOT match ``PoissonSampledDpEvent`` (the paper's error).
  Normalise by ``expected_batch_size`` (= batch_size).

  Integer seeds are refused (see :class:`PoissonSampler`).
  """

  def __init__(self, key: jax.Array, num_examples: int, batch_size: int,
               drop_last: bool = False):
    if batch_size < 1:
      raise ValueError(f'Expected {batch_size=} >= 1')
    if batch_size > num_examples:
      raise ValueError(f'Expected {batch_size=} <= {num_examples=}')
    self.key = secret_keys.as_secret_key(key, what='ShuffledSampler key')
    self._stream = secret_keys.sampling_stream_key(self.key)
    self.num_examples = int(num_examples)
    self.batch_size = int(batch_size)
    self.drop_last = bool(drop_last)
    self._cached_epoch = None
    self._cached_permutation = None

  @property
  def padding_index(self) -> int:
    """The index of padding rows: out of range, never a real example."""
    return self.num_examples

  @property
  def steps_per_epoch(self) -> int:
    if self.drop_last:
      return self.num_examples // self.batch_size
    return -(-self.num_examples // self.batch_size)

  @property
  def expected_batch_size(self) -> int:
    return self.batch_size

  @property
  def sampling_prob(self) -> float:
    """batch_size / num_examples, what the ledger records per step."""
    return self.batch_size / self.num_examples

  def permutation(self, epoch: int) -> np.ndarray:
    """The example order of epoch ``epoch`` (cached for the current epoch)."""
    if epoch != self._cached_epoch:
      with jax.default_device(_cpu_device()):
        permutation = jax.random.permutation(
            jax.random.fold_in(self._stream, epoch), self.num_examples)
      self._cached_permutation = np.asarray(permutation, np.int32)
      self._cached_epoch = epoch
    return self._cached_permutation

  def sample(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(indices, mask)`` of length ``batch_size`` for ``step``."""
    epoch, position = divmod(step, self.steps_per_epoch)
    start = position * self.batch_size
    indices = self.permutation(epoch)[start:start + self.batch_size]
    return _pad(indices, self.batch_size, self.padding_index)

  def batch(self, step: int) -> PaddedBatch:
    """:meth:`sample` as a :class:`PaddedBatch` (same indices and mask)."""
    indices, mask = self.sample(step)
    return PaddedBatch(indices, mask, self.num_examples)
