"""Statistical and exact tests of the batch samplers."""

import math

import jax
import numpy as np
import pytest
import scipy.stats

from dpjax import sampling


def test_poisson_inclusion_frequency_matches_q():
  num_examples, q, num_steps = 100, 0.2, 200
  sampler = sampling.PoissonSampler(jax.random.key(0), num_examples, q)
  inclusion = np.stack([sampler.inclusion(step) for step in range(num_steps)])

  total = int(inclusion.sum())
  assert scipy.stats.binomtest(total, num_examples * num_steps, q).pvalue > 1e-3
  # Every example's count is Binomial(num_steps, q) (Bonferroni over examples).
  per_example_p = [scipy.stats.binomtest(int(k), num_steps, q).pvalue
                   for k in inclusion.sum(axis=0)]
  assert min(per_example_p) > 1e-3 / num_examples
  # Independence across examples: P(both 0 and 1 included) is about q^2.
  both = int(np.sum(inclusion[:, 0] & inclusion[:, 1]))
  assert scipy.stats.binomtest(both, num_steps, q * q).pvalue > 1e-3


def test_poisson_is_deterministic_per_key_and_step():
  make = lambda seed: sampling.PoissonSampler(jax.random.key(seed), 50, 0.3)
  a, b = make(0), make(0)
  for step in (0, 5, 123456):
    np.testing.assert_array_equal(a.sample(step)[0], b.sample(step)[0])
    np.testing.assert_array_equal(a.sample(step)[1], b.sample(step)[1])
  assert not np.array_equal(a.inclusion(0), a.inclusion(1))
  assert not np.array_equal(a.inclusion(0), make(1).inclusion(0))


def test_poisson_fixed_shapes_padding_and_default_capacity():
  num_examples, q = 1000, 0.05
  sampler = sampling.PoissonSampler(jax.random.key(3), num_examples, q,
                                    multiple_of=16)
  expected = q * num_examples
  std = math.sqrt(num_examples * q * (1 - q))
  assert sampler.capacity == 16 * math.ceil(math.ceil(expected + 6 * std) / 16)
  assert sampler.expected_batch_size == pytest.approx(50.0)

  for step in range(5):
    indices, mask = sampler.sample(step)
    assert indices.shape == mask.shape == (sampler.capacity,)
    assert indices.dtype == np.int32 and mask.dtype == bool
    included = np.flatnonzero(sampler.inclusion(step))
    np.testing.assert_array_equal(indices[mask], included)
    assert np.all(indices[~mask] == 0)
    assert mask[:len(included)].all() and not mask[len(included):].any()
  assert sampler.num_capacity_overflows == 0


def test_poisson_overflow_grows_capacity_and_drops_nothing():
  sampler = sampling.PoissonSampler(jax.random.key(4), 60, 0.5, capacity=3,
                                    multiple_of=4)
  assert sampler.capacity == 4
  indices, mask = sampler.sample(0)
  included = np.flatnonzero(sampler.inclusion(0))
  assert len(included) > 4
  np.testing.assert_array_equal(indices[mask], included)
  assert sampler.capacity == len(indices) and sampler.capacity % 4 == 0
  assert sampler.num_capacity_overflows == 1


def test_poisson_rejects_bad_arguments():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match='sampling_prob'):
    sampling.PoissonSampler(key, 10, 0.0)
  with pytest.raises(ValueError, match='num_examples'):
    sampling.PoissonSampler(key, 0, 0.5)


def test_shuffled_covers_every_example_once_per_epoch():
  num_examples, batch_size = 23, 5
  sampler = sampling.ShuffledSampler(jax.random.key(5), num_examples,
                                     batch_size)
  assert sampler.steps_per_epoch == 5
  assert sampler.expected_batch_size == 5
  epochs = []
  for epoch in range(2):
    seen = []
    for position in range(sampler.steps_per_epoch):
      indices, mask = sampler.sample(epoch * sampler.steps_per_epoch + position)
      assert indices.shape == mask.shape == (batch_size,)
      seen.extend(indices[mask].tolist())
    assert sorted(seen) == list(range(num_examples))
    epochs.append(seen)
  assert epochs[0] != epochs[1]  # a fresh permutation each epoch
  # The last batch is short (23 = 4 * 5 + 3) and masked.
  assert sampler.sample(4)[1].sum() == 3


def test_shuffled_drop_last_skips_remainder_without_repeats():
  sampler = sampling.ShuffledSampler(jax.random.key(6), 23, 5, drop_last=True)
  assert sampler.steps_per_epoch == 4
  seen = np.concatenate([sampler.sample(step)[0] for step in range(4)])
  assert len(set(seen.tolist())) == 20
  assert all(sampler.sample(step)[1].all() for step in range(4))
  # Deterministic per (key, step).
  again = sampling.ShuffledSampler(jax.random.key(6), 23, 5, drop_last=True)
  np.testing.assert_array_equal(again.sample(6)[0], sampler.sample(6)[0])


def test_shuffled_rejects_batch_larger_than_dataset():
  with pytest.raises(ValueError, match='batch_size=11 <= num_examples=10'):
    sampling.ShuffledSampler(jax.random.key(0), 10, 11)
