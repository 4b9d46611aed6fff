"""Samplers for privacy noise whose tails floating point does not cut short.

float32 ``jax.random.normal`` turns ONE 32-bit word into a uniform with 23 bits, then into a
normal by the inverse CDF: its samples lie in [-5.42, 5.22]. Against a record whose clipped
gradient C lies on one coordinate, the neighbouring data set's output (noise shifted by
C / (zC) = 1/z standard deviations) lands beyond 5.22, where the other data set's output
cannot be, with probability P(N > 5.22 - 1/z): 9e-6 per step at z = 1.07, 6.3e-4 over 70
steps, 60x a delta of 1e-5 (:func:`one_dimensional_truncation_delta`).

:func:`standard_normal` draws normals in PAIRS by Box-Muller from four 32-bit words, in float32
and uint32 only (no ``jax_enable_x64``; jit on CPU, GPU and TPU):

* radius ``r = sqrt(-2 ln u)`` from a 96-bit uniform ``u = (K + 1/2) 2^-96`` (K the integer of
  three words, summed in float32 from the lowest word up, so u keeps float32's relative
  precision wherever u >= 2^-72). Hence ``|sample| <= SUPPORT_BOUND = sqrt(194 ln 2) = 11.596``
  standard deviations; an exact normal exceeds it with probability
  ``TAIL_MASS = P(|N| > 11.596) = 4.3e-31``.
* angle from the fourth word: 3 bits pick one of the 8 symmetries of the square (swap the two
  coordinates, flip either sign) and 29 bits an angle psi in (0, pi/4), so cos and sin are
  evaluated only where float32 computes them accurately and the pair is exactly symmetric.

Cost: two random words per normal instead of one; 2.0 to 2.2x ``jax.random.normal`` for 11M
normals on 2 busy CPU cores (``python -m benchmarks.noise_sampler``: 0.26 s against 0.13 s),
a small part of a DP-SGD step, which draws them once per logical batch.

Formal statement (:func:`truncation_delta`). Model: exact arithmetic and a continuous u, i.e.
the pair is an exact normal pair except that its radius is capped (u < 2^-96, probability
2^-96); below that cap the radius is exact up to R = sqrt(192 ln 2) = 11.537. For a neighbour
whose noised sums differ by a vector of L2 norm <= C = (1/z) noise standard deviations, a
mechanism (epsilon, delta)-DP with exact normals is (epsilon, delta + truncation_delta)-DP
with these samplers: the implemented and exact outputs coincide unless, in some step, a pair
whose mean differs between the two data sets lands outside the other data set's disc of radius
R or on the cap, and for one pair shifted by s that has probability
<= exp(-(R - s)^2 / 2) + 2^-96. One coordinate, z = 0.5, 10^6 steps: 1.8e-14; the finding's
z = 1.07 over 70 steps: 2.7e-23.

Not covered (as for every float implementation; docs/GUARANTEES.md): float32 rounding of the
sample and of ``sum + noise`` (Mironov, "On significance of the least significant bits for
differential privacy", CCS 2012), and u's grid, which is coarser than float32 resolution only
where u < 2^-72 (radius > 9.99, probability 2^-72 per pair).

>>> import jax
>>> z = standard_normal(jax.random.key(0), (3, 5))
>>> z.shape, z.dtype
((3, 5), dtype('float32'))
>>> print(f'{truncation_delta(0.5, 10**6):.1e}')
1.8e-14
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import jax
import jax.numpy as jnp

RADIUS_BITS = 96  # Bits of the uniform behind each radius.
SUPPORT_BOUND = math.sqrt(-2.0 * math.log(2.0 ** -(RADIUS_BITS + 1)))  # u >= 2^-97.
EXACT_RADIUS = math.sqrt(-2.0 * math.log(2.0 ** -RADIUS_BITS))  # Exact radius below it.
CAP_MASS = 2.0 ** -RADIUS_BITS  # P(u < 2^-96): the radius is capped.
TAIL_MASS = math.erfc(SUPPORT_BOUND / math.sqrt(2.0))  # P(|N| > SUPPORT_BOUND), exact normal.

# float32 jax.random.normal: sqrt(2) erfinv(v) with v = -1 + 2^-24 + 2 f, f in [0, 1 - 2^-23]
# (23 random bits), i.e. v in [-1 + 2^-24, 1 - 3 * 2^-24], so N in [Phi^-1(2^-25),
# Phi^-1(1 - 1.5 * 2^-24)] = [-5.42, 5.22].
JAX_FLOAT32_NORMAL_SUPPORT = (NormalDist().inv_cdf(2.0**-25),
                              -NormalDist().inv_cdf(1.5 * 2.0**-24))

_TWO_M32 = 2.0**-32
_TWO_M29 = 2.0**-29


def normals_from_words(words: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The deterministic map of :func:`standard_normal`: uint32 words [4, ...] -> two normals.

  ``words[0:3]`` (lowest, middle, top 32 bits) give the 96-bit uniform
  ``u = (K + 1/2) 2^-96`` of the radius, ``words[3]`` the angle. Returned: the two float32
  coordinates of the pair, each of shape ``words.shape[1:]``. Exposed so that tests can feed
  chosen words (e.g. all zero: the largest radius, SUPPORT_BOUND).
  """
  words = jnp.asarray(words, jnp.uint32)
  as_float = lambda w: w.astype(jnp.float32)
  # From the lowest word up: each partial sum is in [0, 1] x 2^32, so the float32 sum keeps
  # 24 significant bits of K whatever its size (the words below add less than an ulp).
  u = (as_float(words[0]) + 0.5) * _TWO_M32
  u = (as_float(words[1]) + u) * _TWO_M32
  u = (as_float(words[2]) + u) * _TWO_M32  # In [2^-97, 1]: log(u) <= 0.
  radius = jnp.sqrt(-2.0 * jnp.log(u))
  angle_word = words[3]
  # psi uniform in (0, pi/4): the fundamental domain of the square's 8 symmetries.
  psi = (as_float(angle_word & 0x1FFFFFFF) + 0.5) * (math.pi / 4 * _TWO_M29)
  cos, sin = jnp.cos(psi), jnp.sin(psi)
  swap = (angle_word >> 29) & 1 == 1
  first, second = jnp.where(swap, sin, cos), jnp.where(swap, cos, sin)
  first = jnp.where((angle_word >> 30) & 1 == 1, -first, first)
  second = jnp.where((angle_word >> 31) == 1, -second, second)
  return radius * first, radius * second


def standard_normal(key: jax.Array, shape: Sequence[int] = (), dtype=jnp.float32) -> jax.Array:
  """Standard normal samples with tails to 11.6 standard deviations (see the module docstring).

  A drop-in for ``jax.random.normal(key, shape, dtype)`` (also as the ``sampler`` of
  ``optax.tree_utils.tree_random_like``): float32 and uint32 arithmetic only, so it runs
  under jit on every backend without x64. The samples are computed in float32 and cast to
  ``dtype`` (a floating dtype).

  Formal guarantees:
    i.i.d. normal up to float32 rounding, with |sample| <= SUPPORT_BOUND; used for DP noise
    the truncation costs at most :func:`truncation_delta` (module docstring: the model).
  """
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'Expected a floating dtype for normal samples, got {dtype}')
  shape = tuple(int(s) for s in shape)
  size = math.prod(shape)
  pairs = (size + 1) // 2
  words = jax.random.bits(key, (4, pairs), jnp.uint32)
  first, second = normals_from_words(words)
  # Interleaved, so element 2i and 2i+1 come from pair i; an odd size drops one coordinate.
  samples = jnp.stack([first, second], axis=-1).reshape(-1)[:size]
  return samples.reshape(shape).astype(dtype)


def _check_noise_and_steps(noise_multiplier, steps) -> tuple[float, int]:
  noise_multiplier, steps = float(noise_multiplier), int(steps)
  if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
    raise ValueError(f'Expected a finite noise_multiplier > 0, got {noise_multiplier}')
  if steps < 0:
    raise ValueError(f'Expected steps >= 0, got {steps}')
  return noise_multiplier, steps


def _over_steps(per_step: float, steps: int) -> float:
  """P(a per-step event of probability <= per_step happens in some of `steps` steps)."""
  if per_step >= 1.0:
    return 1.0 if steps else 0.0
  return -math.expm1(steps * math.log1p(-per_step))


def truncation_delta(noise_multiplier: float, steps: int, *, num_coordinates: int = 1) -> float:
  """Extra delta that :func:`standard_normal`'s capped tails cost a Gaussian mechanism.

  Args:
    noise_multiplier: z; a neighbour moves the noised sum by at most 1/z noise standard
      deviations in L2 norm (sensitivity C, noise std zC).
    steps: the number of noisy releases (DP-SGD steps) composed.
    num_coordinates: how many noised coordinates the neighbour can move: 1 for the
      one-coordinate record of the finding (issue 23), the number of model parameters for
      any neighbour.

  Returns:
    delta_extra such that a mechanism (epsilon, delta)-DP with exact normal noise is
    (epsilon, delta + delta_extra)-DP with this sampler, for every epsilon, in the model of
    the module docstring. Per step, with s_p the shift of pair p (sum of s_p^2 <= 1/z^2, at most
    num_coordinates pairs with s_p > 0) the bound is the sum over pairs of
    exp(-(R - s_p)^2 / 2) + 2^-96 (R = EXACT_RADIUS), bounded for any split a by
    num_coordinates exp(-(R - a)^2 / 2) for the pairs with s_p < a plus
    (1 / (z a))^2 exp(-(R - 1/z)^2 / 2) for the others; the best a on a grid is used.

  >>> print(f'{truncation_delta(1.07, 70):.1e}')
  2.7e-23
  >>> print(f'{truncation_delta(0.5, 10**6, num_coordinates=11_000_000):.1e}')
  3.0e-13
  """
  noise_multiplier, steps = _check_noise_and_steps(noise_multiplier, steps)
  num_coordinates = int(num_coordinates)
  if num_coordinates < 1:
    raise ValueError(f'Expected num_coordinates >= 1, got {num_coordinates}')
  shift = 1.0 / noise_multiplier
  if shift >= EXACT_RADIUS:
    return _over_steps(1.0, steps)
  outside = lambda s: math.exp(-0.5 * (EXACT_RADIUS - s) ** 2)  # P(|pair| > R - s).
  if num_coordinates == 1:
    spread = outside(shift)
  else:
    splits = [shift * 2.0 ** (-i / 16) for i in range(400)]
    spread = min(num_coordinates * outside(a) + math.floor((shift / a) ** 2) * outside(shift)
                 for a in splits)
  return _over_steps(min(1.0, spread + num_coordinates * CAP_MASS), steps)


def one_dimensional_truncation_delta(noise_multiplier: float, steps: int,
                                     support_bound: float) -> float:
  """Delta lost by noise capped at `support_bound` std (as float32 jax.random.normal at 5.22).

  The record of the finding: its clipped gradient C lies on one coordinate, so with noise
  std zC the neighbour shifts that coordinate by 1/z std. Outputs beyond the cap are
  impossible without the record and have probability P(N > B - 1/z) with it, per step: an
  attacker who sees one knows the record is in (privacy loss infinite). Returns the
  probability that this happens in some of `steps` steps, 1 - (1 - P(N > B - 1/z))^steps,
  a lower bound on the delta of such a sampler (and equal to its extra delta when it is an
  exact normal truncated to [-B, B], up to a factor 1 / P(|N| <= B)^steps).

  >>> high = JAX_FLOAT32_NORMAL_SUPPORT[1]
  >>> print(f'{high:.2f} {one_dimensional_truncation_delta(1.07, 1, high):.1e} '
  ...       f'{one_dimensional_truncation_delta(1.07, 70, high):.1e}')
  5.22 9.1e-06 6.4e-04
  """
  noise_multiplier, steps = _check_noise_and_steps(noise_multiplier, steps)
  per_step = 0.5 * math.erfc((float(support_bound) - 1.0 / noise_multiplier) / math.sqrt(2.0))
  return _over_steps(per_step, steps)
