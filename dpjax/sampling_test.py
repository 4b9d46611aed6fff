"""Statistical and exact tests of the batch samplers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from dpjax import sampling
from dpjax import secret_keys


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
    # Padding never points at a real example: a gather that ignores the mask fails loudly.
    assert sampler.padding_index == num_examples and np.all(indices[~mask] == num_examples)
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


def test_exact_sampling_prob_is_the_integer_threshold():
  # q * 2**32 rounded up: never below the request, within 2**-32 of it.
  for q in (0.1, 128 / 5218, 1 / 3, 1e-9, 1.0):
    exact = sampling.exact_sampling_prob(q)
    assert q <= exact < q + 2.0**-32
    assert (exact * 2**32).is_integer()
  assert sampling.exact_sampling_prob(0.25) == 0.25  # Exactly representable: unchanged.
  sampler = sampling.PoissonSampler(jax.random.key(0), 10, 1 / 3)
  assert sampler.sampling_prob == sampling.exact_sampling_prob(1 / 3)
  assert sampler.requested_sampling_prob == 1 / 3
  assert sampling.PoissonSampler(jax.random.key(0), 10, 1.0).inclusion(3).all()


def _patients():
  # Sizes 1, 3, 2, 5, 1 (positions 0..11), given out of order on purpose.
  return [np.array([4]), np.array([0, 1, 2]), np.array([3, 11]), np.array([5, 6, 7, 8, 9]),
          np.array([10])]


def test_unit_sampling_keeps_units_whole_in_fixed_slots():
  units = _patients()
  sampler = sampling.PoissonSampler(jax.random.key(7), 12, 0.6, units=units, max_unit_size=3)
  assert sampler.num_units == 5
  assert sampler.expected_batch_size == pytest.approx(3.0)
  for step in range(20):
    indices, mask = sampler.sample(step)
    assert indices.shape == mask.shape == (sampler.capacity * 3,)
    rows, row_mask = indices.reshape(-1, 3), mask.reshape(-1, 3)
    included = np.flatnonzero(sampler.inclusion(step))
    assert row_mask.any(axis=1).sum() == len(included)
    for slot, unit in enumerate(included):
      chosen = rows[slot][row_mask[slot]]
      # Every slot row holds one unit's examples only, all of them if they fit, else 3 distinct.
      assert len(chosen) == min(3, len(units[unit]))
      assert set(chosen.tolist()) <= set(units[unit].tolist())
      assert len(set(chosen.tolist())) == len(chosen)
      assert row_mask[slot, :len(chosen)].all()  # Real slots first, then padding.
    assert not row_mask[len(included):].any()


def test_unit_choice_is_uniform_and_independent_of_other_units():
  units = _patients()
  sampler = sampling.PoissonSampler(jax.random.key(8), 12, 1.0, units=units, max_unit_size=2)
  counts = np.zeros(12)
  steps = 400
  for step in range(steps):
    indices, mask = sampler.sample(step)
    slot = indices.reshape(-1, 2)[3][mask.reshape(-1, 2)[3]]  # Unit 3: 5 examples, 2 slots.
    counts[slot] += 1
  # Each of the 5 examples is chosen with probability 2/5.
  for position in units[3]:
    assert scipy.stats.binomtest(int(counts[position]), steps, 0.4).pvalue > 1e-3
  # Dropping another unit (a neighbouring data set) leaves unit 3's choices unchanged.
  fewer = sampling.PoissonSampler(jax.random.key(8), 12, 1.0,
                                  units=units[:2] + [np.array([3])] + units[3:], max_unit_size=2)
  for step in range(5):
    a = sampler.sample(step)[0].reshape(-1, 2)[3]
    b = fewer.sample(step)[0].reshape(-1, 2)[3]
    np.testing.assert_array_equal(a, b)


def test_unit_sampler_rejects_overlapping_or_out_of_range_units():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match='disjoint'):
    sampling.PoissonSampler(key, 5, 0.5, units=[np.array([0, 1]), np.array([1])])
  with pytest.raises(ValueError, match='disjoint'):
    sampling.PoissonSampler(key, 5, 0.5, units=[np.array([0, 5])])
  with pytest.raises(ValueError, match='max_unit_size'):
    sampling.PoissonSampler(key, 5, 0.5, max_unit_size=2)


def test_padding_rows_never_point_at_a_real_example():
  # A caller whose wrapper drops the mask (flax's TrainState.apply_gradients) would count
  # a real padding example many times; an out-of-range index makes a plain gather fail.
  data = np.arange(20.0)
  for sampler in (sampling.PoissonSampler(jax.random.key(9), 20, 0.2, multiple_of=16),
                  sampling.PoissonSampler(jax.random.key(9), 20, 0.5, units=_patients() + [
                      np.arange(12, 20)], max_unit_size=3),
                  sampling.ShuffledSampler(jax.random.key(9), 20, 6)):
    padded_steps = 0
    for step in range(4):
      indices, mask = sampler.sample(step)
      assert (indices[mask] < 20).all()
      np.testing.assert_array_equal(data[indices[mask]], indices[mask])
      if (~mask).any():
        padded_steps += 1
        assert set(indices[~mask].tolist()) == {20}
        with pytest.raises(IndexError):
          data[indices]  # pylint: disable=pointless-statement
    assert padded_steps


# --- Misuse (issue 23, point 5): integer keys, domain separation, the safe gather. ---------

@pytest.mark.parametrize('key', [0, 7, np.int64(3), np.uint32(1), True], ids=repr)
def test_samplers_refuse_integer_and_bool_keys(key):
  # An integer is a seed, not a secret: whoever knows it replays every batch.
  with pytest.raises(ValueError, match='integer seed|bool'):
    sampling.PoissonSampler(key, 10, 0.5)
  with pytest.raises(ValueError, match='integer seed|bool'):
    sampling.ShuffledSampler(key, 10, 5)


def test_sampler_stream_is_domain_separated_from_the_callers_key():
  key = jax.random.key(11)  # A test key: not secret.
  sampler = sampling.PoissonSampler(key, 500, 0.3)
  stream = secret_keys.sampling_stream_key(key)
  for step in (0, 3):
    step_key = jax.random.fold_in(jax.random.fold_in(stream, step), 0)
    np.testing.assert_array_equal(sampler.inclusion(step),
                                  sampling.exact_bernoulli(step_key, 0.3, (500,)))
    # The old derivation used the caller's key directly: the same bits as the first noise
    # leaf of dp_sgd at that step when one key served both (see transforms_test).
    old_key = jax.random.fold_in(jax.random.fold_in(key, step), 0)
    assert not np.array_equal(sampler.inclusion(step),
                              sampling.exact_bernoulli(old_key, 0.3, (500,)))
  shuffled = sampling.ShuffledSampler(key, 50, 5)
  np.testing.assert_array_equal(
      shuffled.permutation(2), jax.random.permutation(jax.random.fold_in(stream, 2), 50))


def _samplers(num_examples=20):
  key = jax.random.key(12)  # A test key: not secret.
  return [sampling.PoissonSampler(key, num_examples, 0.2, multiple_of=16),
          sampling.PoissonSampler(key, num_examples, 0.5, units=_patients() + [
              np.arange(12, num_examples)], max_unit_size=3),
          sampling.ShuffledSampler(key, num_examples, 6)]


@pytest.mark.parametrize('kind', ['numpy', 'jax', 'jit'])
def test_padded_batch_gather_zero_fills_padding_and_reads_no_example_for_it(kind):
  num_examples = 20
  # Every example is nonzero, so a zero padding row came from no example.
  features = np.arange(1.0, 1.0 + 3 * num_examples, dtype=np.float32).reshape(num_examples, 3)
  labels = np.arange(1, 1 + num_examples, dtype=np.int32)
  flags = np.ones(num_examples, bool)
  data = {'x': features, 'y': labels, 'flag': flags}
  if kind != 'numpy':
    data = jax.tree.map(jnp.asarray, data)
  gather = jax.jit(lambda batch, data: batch.gather(data)) if kind == 'jit' else (
      lambda batch, data: batch.gather(data))
  for sampler in _samplers(num_examples):
    padded_steps = 0
    for step in range(4):
      batch = sampler.batch(step)
      indices, mask = sampler.sample(step)
      np.testing.assert_array_equal(batch.indices, indices)
      np.testing.assert_array_equal(batch.mask, mask)
      rows = gather(batch, data)
      assert isinstance(rows['x'], np.ndarray) == (kind == 'numpy')
      rows = jax.tree.map(np.asarray, rows)
      np.testing.assert_array_equal(rows['x'][mask], features[indices[mask]])
      np.testing.assert_array_equal(rows['y'][mask], labels[indices[mask]])
      assert rows['flag'][mask].all() and rows['flag'].dtype == bool
      if (~mask).any():
        padded_steps += 1
        assert (rows['x'][~mask] == 0).all() and (rows['y'][~mask] == 0).all()
        assert not rows['flag'][~mask].any()
        if kind != 'numpy':
          # Why the gather exists: jnp indexing CLAMPS the padding index to the last example.
          clamped = np.asarray(jnp.asarray(features)[indices])
          np.testing.assert_array_equal(clamped[~mask][0], features[-1])
    assert padded_steps


def test_padded_batch_gather_refuses_data_of_another_length():
  batch = sampling.PoissonSampler(jax.random.key(0), 20, 0.2).batch(0)
  # A longer array would make the padding index a real row.
  for data in (np.zeros((21, 2)), jnp.zeros((21, 2)), np.zeros((19,))):
    with pytest.raises(ValueError, match='expected an array of 20 examples'):
      batch.gather(data)


def test_padded_batch_is_a_pytree_and_traces_once():
  sampler = sampling.PoissonSampler(jax.random.key(13), 64, 0.25, multiple_of=8)
  traces = 0

  @jax.jit
  def count_real(batch):
    nonlocal traces
    traces += 1
    return jnp.sum(batch.mask)

  for step in range(4):
    batch = sampler.batch(step)
    assert int(count_real(batch)) == int(batch.mask.sum())
  assert traces == 1
  leaves = jax.tree.leaves(sampler.batch(0))
  assert len(leaves) == 2  # indices and mask; num_examples is static
