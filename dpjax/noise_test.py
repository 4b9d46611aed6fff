"""Tests of dpjax.noise: the word-to-normal map, the distribution (body and tails), the support
bound, and the truncation deltas (issue 23, point 8).

Draws use fixed keys; statistical thresholds are loose (p > 1e-3, Poisson 5 sigma)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from dpjax import noise


def _words(*rows):
  return jnp.asarray(np.array(rows, np.uint32).reshape(4, -1))


def test_all_zero_words_give_the_support_bound_and_nothing_exceeds_it():
  # K = 0: u = 2^-97, the smallest uniform; the angle psi is ~0 so the first coordinate is r.
  first, second = noise.normals_from_words(_words(0, 0, 0, 0))
  assert float(first[0]) == pytest.approx(noise.SUPPORT_BOUND, rel=1e-6)
  assert noise.SUPPORT_BOUND == pytest.approx(math.sqrt(194 * math.log(2)))
  assert abs(float(second[0])) < 1e-6
  # The largest values: every radius word at 0 or 1, every angle at its extremes.
  extremes = np.array(np.meshgrid([0, 1], [0, 1], [0, 1], [0, 2**29 - 1, 2**32 - 1]))
  pair = noise.normals_from_words(jnp.asarray(extremes.reshape(4, -1), jnp.uint32))
  assert max(float(jnp.abs(p).max()) for p in pair) <= noise.SUPPORT_BOUND * (1 + 1e-6)


def test_radius_is_sqrt_minus_two_log_of_the_96_bit_uniform():
  """u = (K + 1/2) 2^-96 with K the three words (lowest first): every word counts, down to
  K = 1 (radius 11.50), far beyond a 32-bit uniform's 6.7 or a 64-bit one's 9.4."""
  rng = np.random.default_rng(0)
  ks = [1, 2**20, 2**32 - 1, 2**32, 2**45 + 7, 2**64 - 1, 2**70 + 3, 2**95, 2**96 - 1]
  ks += [int(x) << 40 | int(y) for x, y in rng.integers(0, 2**56, (200, 2), dtype=np.uint64)]
  mask = 2**32 - 1
  words = _words([k & mask for k in ks], [(k >> 32) & mask for k in ks],
                 [(k >> 64) & mask for k in ks], [0] * len(ks))
  first, second = noise.normals_from_words(words)
  radius = np.hypot(np.asarray(first, np.float64), np.asarray(second, np.float64))
  exact = np.sqrt(-2 * np.log((np.array(ks, np.float64) + 0.5) * 2.0**-96))
  np.testing.assert_allclose(radius, exact, rtol=1e-5, atol=2e-3)  # atol: r ~ 0 at K ~ 2^96.
  assert radius[0] > 11.4 and radius[1] > 10.2  # Only the lowest word is non-zero.


def test_angle_bits_are_the_eight_symmetries_of_the_square():
  psi_bits = np.random.default_rng(1).integers(0, 2**29, 64, dtype=np.uint32)
  radius_words = [np.full(64, 5, np.uint32), np.full(64, 7, np.uint32), np.full(64, 2**30)]
  base = noise.normals_from_words(_words(*radius_words, psi_bits))
  for bit, expected in ((29, (base[1], base[0])), (30, (-base[0], base[1])),
                        (31, (base[0], -base[1]))):
    flipped = noise.normals_from_words(_words(*radius_words, psi_bits | np.uint32(1 << bit)))
    np.testing.assert_array_equal(flipped[0], expected[0])
    np.testing.assert_array_equal(flipped[1], expected[1])
  assert np.all(np.abs(base[1]) <= np.abs(base[0]))  # psi in (0, pi/4).


@pytest.mark.parametrize('seed', [0, 1])
def test_body_is_standard_normal(seed):
  n = 2_000_000
  z = np.asarray(noise.standard_normal(jax.random.key(seed), (n,)), np.float64)
  assert abs(z.mean()) < 5 / math.sqrt(n)
  assert abs(z.std() - 1) < 5 * math.sqrt(0.5 / n)
  assert stats.kstest(z, 'norm').pvalue > 1e-3
  # Frequencies in bins of |z| (to 4.5 sd) against the exact normal.
  edges = np.array([0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, np.inf])
  counts = np.histogram(np.abs(z), edges)[0]
  expected = n * 2 * -np.diff(stats.norm.sf(edges))
  assert stats.chisquare(counts, expected).pvalue > 1e-3
  # The two coordinates of a pair are independent (uncorrelated, and so are their squares).
  assert abs(np.corrcoef(z[0::2], z[1::2])[0, 1]) < 5 / math.sqrt(n / 2)
  assert abs(np.corrcoef(z[0::2] ** 2, z[1::2] ** 2)[0, 1]) < 5 / math.sqrt(n / 2)


def test_tails_have_normal_frequencies_and_pass_float32_normal_support():
  """2^27 draws (on device, in chunks): counts beyond 4.5 and 5 sd match the exact normal, and
  the largest |z| exceeds 5.5, which float32 jax.random.normal cannot produce (its bound is
  5.42; expected count beyond 5.5 here: 5.1)."""
  chunk, chunks = 2**24, 8
  thresholds = jnp.array([4.5, 5.0, 5.5])

  @jax.jit
  def summarize(key):
    def one(i):
      z = jnp.abs(noise.standard_normal(jax.random.fold_in(key, i), (chunk,)))
      return jnp.sum(z[:, None] > thresholds, axis=0), jnp.max(z)
    counts, largest = jax.lax.map(one, jnp.arange(chunks))
    return counts.sum(axis=0), largest.max()

  counts, largest = summarize(jax.random.key(3))
  n = chunk * chunks
  for count, t in zip(np.asarray(counts), (4.5, 5.0, 5.5)):
    mean = n * 2 * stats.norm.sf(t)
    assert abs(count - mean) < 5 * math.sqrt(mean) + 1, (t, count, mean)
  assert float(largest) > 5.5 > max(abs(b) for b in noise.JAX_FLOAT32_NORMAL_SUPPORT)


def test_shapes_dtypes_and_use_as_an_optax_sampler():
  key = jax.random.key(4)
  assert noise.standard_normal(key).shape == ()
  assert noise.standard_normal(key, (0,)).shape == (0,)
  odd = noise.standard_normal(key, (3, 5))
  assert odd.shape == (3, 5) and odd.dtype == jnp.float32
  # An odd size drops the last pair's second coordinate: a prefix of the even draw.
  np.testing.assert_array_equal(odd.ravel(), noise.standard_normal(key, (16,))[:15])
  assert noise.standard_normal(key, (4,), jnp.bfloat16).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match='floating'):
    noise.standard_normal(key, (4,), jnp.int32)
  tree = {'a': jnp.zeros((1000,)), 'b': jnp.zeros((10, 10))}
  sampled = optax.tree_utils.tree_random_like(key, tree, sampler=noise.standard_normal)
  assert jax.tree.map(jnp.shape, sampled) == jax.tree.map(jnp.shape, tree)
  assert abs(np.corrcoef(sampled['a'][:100], np.ravel(sampled['b']))[0, 1]) < 0.5
  # Raw uint32 keys work like typed ones.
  np.testing.assert_array_equal(noise.standard_normal(jax.random.PRNGKey(5), (8,)),
                                noise.standard_normal(jax.random.key(5), (8,)))


def test_needs_no_float64():
  # (JAX's own threefry counters are 64-bit integers even without x64; no float64 is used.)
  assert not jax.config.jax_enable_x64
  text = jax.jit(noise.standard_normal, static_argnums=1).lower(jax.random.key(0), (10,)).as_text()
  assert 'f64' not in text


def test_constants_match_their_definitions():
  # float32 jax.random.normal's extremes: sqrt(2) erfinv at its smallest and largest uniforms.
  low, high = np.float32(-1 + 2.0**-24), np.float32(1 - 3 * 2.0**-24)
  extremes = np.sqrt(np.float32(2)) * np.asarray(jax.lax.erf_inv(jnp.array([low, high])))
  np.testing.assert_allclose(extremes, noise.JAX_FLOAT32_NORMAL_SUPPORT, rtol=1e-5)
  assert noise.TAIL_MASS == pytest.approx(2 * stats.norm.sf(noise.SUPPORT_BOUND), rel=1e-6)
  assert noise.TAIL_MASS < 1e-30
  assert noise.CAP_MASS == 2.0**-96


def test_truncation_delta_of_float32_jax_normal_reproduces_the_finding():
  """Issue 23, point 8: at z = 1.07 (epsilon 8) the neighbour's output passes 5.22 with
  probability 9e-6 per step, 6.3e-4 over 70 steps: 60x delta = 1e-5."""
  high = noise.JAX_FLOAT32_NORMAL_SUPPORT[1]
  per_step = noise.one_dimensional_truncation_delta(1.07, 1, high)
  assert per_step == pytest.approx(stats.norm.sf(high - 1 / 1.07), rel=1e-9)
  assert per_step == pytest.approx(9.1e-6, rel=0.01)
  over_70 = noise.one_dimensional_truncation_delta(1.07, 70, high)
  assert over_70 == pytest.approx(1 - (1 - per_step) ** 70, rel=1e-9)
  assert 6.3e-4 <= over_70 < 6.5e-4 and over_70 > 60 * 1e-5
  # With this sampler's bound instead, the same attack is negligible.
  assert noise.one_dimensional_truncation_delta(1.07, 70, noise.SUPPORT_BOUND) < 1e-20


def test_truncation_delta_of_this_sampler_is_negligible():
  per_step = math.exp(-0.5 * (noise.EXACT_RADIUS - 2.0) ** 2) + 2.0**-96
  assert noise.truncation_delta(0.5, 1) == pytest.approx(per_step, rel=1e-9)
  assert noise.truncation_delta(0.5, 10**6) == pytest.approx(10**6 * per_step, rel=1e-6)
  assert noise.truncation_delta(0.5, 10**6) < 1e-12  # One coordinate, z = 0.5, 10^6 steps.
  assert noise.truncation_delta(1.07, 70) < 1e-20  # The finding's setting.
  # Any neighbour of an 11M-parameter model (the shift spread over up to 11M coordinates).
  assert noise.truncation_delta(0.5, 10**6, num_coordinates=11_000_000) < 1e-12
  assert (noise.truncation_delta(0.5, 10**6, num_coordinates=11_000_000)
          >= noise.truncation_delta(0.5, 10**6))
  # Monotone: more steps or less noise cost more; no noise is no guarantee.
  assert noise.truncation_delta(0.3, 100) > noise.truncation_delta(0.5, 100)
  assert noise.truncation_delta(0.5, 1000) > noise.truncation_delta(0.5, 100)
  assert noise.truncation_delta(0.05, 10) == 1.0
  assert noise.truncation_delta(0.5, 0) == 0.0
  for bad in (0.0, -1.0, math.nan, math.inf):
    with pytest.raises(ValueError, match='noise_multiplier'):
      noise.truncation_delta(bad, 10)
