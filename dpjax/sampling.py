"""Batch selection with fixed shapes, randomness from explicit JAX keys only.

Both samplers return ``(indices, mask)`` for step t: int32 example indices
padded to a fixed length and a bool mask that is False on padding rows. A
padding row holds ``padding_index`` (= the number of examples): never a real
example, so a gather that forgets the mask fails (numpy raises IndexError)
instead of silently counting one example many times. One fixed shape means the
jitted train step compiles once.

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
entropy (``dpjax`` runs do, see ``experiments``), never from a published seed.

>>> import jax
>>> sampler = PoissonSampler(jax.random.key(0), num_examples=100,
...                          sampling_prob=0.1, multiple_of=8)
>>> indices, mask = sampler.sample(step=0)
>>> indices.shape == mask.shape == (sampler.capacity,)
True
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np


def _round_up(value: int, multiple_of: int) -> int:
  return -(-value // multiple_of) * multiple_of


def _pad(indices: np.ndarray, length: int, padding_index: int) -> tuple[np.ndarray, np.ndarray]:
  padded = np.full((length,), padding_index, np.int32)
  padded[:len(indices)] = indices
  mask = np.zeros((length,), bool)
  mask[:len(indices)] = True
  return padded, mask


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
  amplifies nothing.

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
    self.key = key
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
    return jax.random.fold_in(jax.random.fold_in(self.key, step), purpose)

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


class ShuffledSampler:
  """Fixed-size batches from a fresh random permutation each epoch.

  This is what the paper's PyTorch ``DataLoader(shuffle=True)`` does: epoch
  e uses the permutation drawn from ``fold_in(key, e)`` cut into consecutive
  batches of ``batch_size``. With ``drop_last=False`` every example appears
  exactly once per epoch (the short last batch is padded and masked); with
  ``drop_last=True`` the remainder is skipped.

  Accounting: each example is in at most one batch per epoch, and no
  amplification by sampling is claimed. Under replace-one adjacency each
  epoch is one Gaussian mechanism with sensitivity 2C, which
  ``PrivacyLedger('shuffled', steps_per_epoch=sampler.steps_per_epoch)``
  records. It does NOT match ``PoissonSampledDpEvent`` (the paper's error).
  Normalise by ``expected_batch_size`` (= batch_size).
  """

  def __init__(self, key: jax.Array, num_examples: int, batch_size: int,
               drop_last: bool = False):
    if batch_size < 1:
      raise ValueError(f'Expected {batch_size=} >= 1')
    if batch_size > num_examples:
      raise ValueError(f'Expected {batch_size=} <= {num_examples=}')
    self.key = key
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
            jax.random.fold_in(self.key, epoch), self.num_examples)
      self._cached_permutation = np.asarray(permutation, np.int32)
      self._cached_epoch = epoch
    return self._cached_permutation

  def sample(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(indices, mask)`` of length ``batch_size`` for ``step``."""
    epoch, position = divmod(step, self.steps_per_epoch)
    start = position * self.batch_size
    indices = self.permutation(epoch)[start:start + self.batch_size]
    return _pad(indices, self.batch_size, self.padding_index)
