"""Batch selection with fixed shapes, randomness from explicit JAX keys only.

Both samplers return ``(indices, mask)`` for step t: int32 example indices
padded to a fixed length and a bool mask that is False on padding rows (their
index is 0, a valid row, so gathers work; the mask makes them contribute
nothing). One fixed shape means the jitted train step compiles once.

Which accounting event matches which sampler:

* :class:`PoissonSampler`: each example independently with probability q;
  each step is ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` under
  add/remove-one adjacency, i.e. ``PrivacyLedger('poisson')``.
* :class:`ShuffledSampler`: fixed-size batches from a fresh permutation each
  epoch (the paper's data loader); there is no amplification by sampling to
  claim, see ``PrivacyLedger('shuffled', steps_per_epoch=...)``.

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
import numpy as np


def _round_up(value: int, multiple_of: int) -> int:
  return -(-value // multiple_of) * multiple_of


def _pad(indices: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
  padded = np.zeros((length,), np.int32)
  padded[:len(indices)] = indices
  mask = np.zeros((length,), bool)
  mask[:len(indices)] = True
  return padded, mask


def _cpu_device():
  return jax.devices('cpu')[0]


class PoissonSampler:
  """Poisson sampling: each step includes each example independently w.p. q.

  The realised batch size is random (Binomial(N, q)), so batches are padded
  to a fixed ``capacity`` (default: expected size + 6 standard deviations,
  rounded up to ``multiple_of``). If a step ever draws more examples than
  the capacity (probability below about 1e-9 per step at the default), the
  capacity GROWS to fit: examples are never dropped, since dropping would
  make the batches no longer Poisson and the accounting wrong. Growth costs
  one recompilation; it is logged and counted in ``num_capacity_overflows``.

  Accounting: ``PoissonSampledDpEvent(sampling_prob, GaussianDpEvent(z))``
  per step, add/remove-one adjacency (``PrivacyLedger('poisson')``). Normalise
  by ``expected_batch_size`` (q * N), not the realised size.

  Attributes:
    capacity: current padded batch length.
    num_capacity_overflows: how many sampled steps exceeded the capacity.
  """

  def __init__(self, key: jax.Array, num_examples: int, sampling_prob: float,
               capacity: int | None = None, multiple_of: int = 1):
    if num_examples < 1:
      raise ValueError(f'Expected {num_examples=} >= 1')
    if not 0 < sampling_prob <= 1:
      raise ValueError(f'Expected 0 < {sampling_prob=} <= 1')
    if multiple_of < 1:
      raise ValueError(f'Expected {multiple_of=} >= 1')
    self.key = key
    self.num_examples = int(num_examples)
    self.sampling_prob = float(sampling_prob)
    self.multiple_of = int(multiple_of)
    if capacity is None:
      std = math.sqrt(num_examples * sampling_prob * (1 - sampling_prob))
      capacity = min(math.ceil(self.expected_batch_size + 6 * std),
                     self.num_examples)
    if capacity < 1:
      raise ValueError(f'Expected {capacity=} >= 1')
    self.capacity = _round_up(int(capacity), self.multiple_of)
    self.num_capacity_overflows = 0

  @property
  def expected_batch_size(self) -> float:
    """q * N, the constant DP-SGD divides the noisy sum by."""
    return self.sampling_prob * self.num_examples

  def inclusion(self, step: int) -> np.ndarray:
    """Bool ``[num_examples]``: which examples step ``step`` includes."""
    with jax.default_device(_cpu_device()):
      included = jax.random.bernoulli(
          jax.random.fold_in(self.key, step), self.sampling_prob,
          shape=(self.num_examples,))
    return np.asarray(included)

  def sample(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(indices, mask)`` of length ``capacity``; deterministic in
    (key, step) apart from the padding length, which only grows."""
    indices = np.flatnonzero(self.inclusion(step)).astype(np.int32)
    if len(indices) > self.capacity:
      new_capacity = _round_up(len(indices), self.multiple_of)
      logging.warning(
          'PoissonSampler step %d drew %d examples > capacity %d; growing the'
          ' capacity to %d (one recompilation, no example dropped).',
          step, len(indices), self.capacity, new_capacity)
      self.capacity = new_capacity
      self.num_capacity_overflows += 1
    return _pad(indices, self.capacity)


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
    return _pad(indices, self.batch_size)
