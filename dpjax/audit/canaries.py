"""White-box gradient canaries: the one-run audit of DP-SGD (Steinke, Nasr and Jagielski 2023).

m "Dirac" canaries, each a gradient of norm exactly C along one parameter coordinate, are each
included in the training data with probability 1/2; an included canary is Poisson-sampled at
rate q like every example, so the run's guarantee covers it. After training, the parameter
change along each coordinate is its score; guessing the top and bottom scores gives an
empirical lower bound on epsilon (:mod:`dpjax.audit.one_run`), which must stay below the
ledger's. The key must be secret (the run's private canary stream): the audit measures what an
attacker who does not know which canaries were included can guess.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from dpjax import sampling
from dpjax.audit import one_run


class GradientCanaries(NamedTuple):
  coordinates: np.ndarray  # int32 [m]: distinct coordinates of the flattened parameters.
  included: np.ndarray  # bool [m]: which canaries are in the training data.
  initial_values: np.ndarray  # float32 [m]: the parameters there before training.

# Independent streams of the run's secret canary key.
_COORDINATES, _INCLUSION, _SAMPLING = range(3)


def make_gradient_canaries(key: jax.Array, params, num_canaries: int) -> GradientCanaries:
  """m canaries at distinct parameter coordinates, each in the data with probability 1/2.

  `key` must be secret (the run's canary stream): the audit measures what an attacker who
  does not know which canaries were included can guess.
  """
  flat, _ = jax.flatten_util.ravel_pytree(params)
  if num_canaries > flat.size:
    raise ValueError(f'Expected {num_canaries=} <= {flat.size} parameters')
  coordinates = jax.random.choice(jax.random.fold_in(key, _COORDINATES), flat.size,
                                  (num_canaries,), replace=False)
  included = one_run.canary_inclusion(jax.random.fold_in(key, _INCLUSION), num_canaries)
  return GradientCanaries(np.asarray(coordinates, np.int32), np.asarray(included, bool),
                          np.asarray(flat[coordinates], np.float32))


def add_sampled_canaries(grad_sum, canaries: GradientCanaries, key: jax.Array, step,
                         sampling_prob: float, l2_norm_clip: float):
  """Adds step `step`'s Poisson-sampled included canaries to a clipped gradient sum (in jit).

  `key` is the same secret canary key `make_gradient_canaries` took; the sampling of step t
  uses its own stream, independent of the inclusion draw. Each canary's gradient is -C along
  its coordinate (norm C, the clip norm), so descent moves its parameter up.
  """
  step_key = jax.random.fold_in(jax.random.fold_in(key, _SAMPLING), step)
  sampled = sampling.exact_bernoulli(step_key, sampling_prob, canaries.included.shape)
  sampled = sampled & canaries.included
  flat, unravel = jax.flatten_util.ravel_pytree(grad_sum)
  flat = flat.at[canaries.coordinates].add(jnp.where(sampled, -l2_norm_clip, 0.0).astype(flat.dtype))
  return unravel(flat)


def choose_guesses(num_canaries: int, claimed_epsilon: float | None, delta: float,
                   confidence: float = 0.95) -> tuple[int, int]:
  """(k_pos, k_neg) of the audit, from public quantities only (fixed before scoring).

  By default a tenth of the canaries on each side (100 + 100 of 1,000). When their attainable
  maximum does not exceed the claimed epsilon, as many more guesses as
  `one_run.guesses_needed` asks for, so that the audit can refute the claim; when no number of
  guesses can (too few canaries for this epsilon), every canary is guessed on: the highest
  attainable maximum, reported as unable to test the claim.
  """
  total = min(2 * max(1, num_canaries // 10), num_canaries)
  if claimed_epsilon is not None and math.isfinite(claimed_epsilon):
    needed = one_run.guesses_needed(claimed_epsilon, delta, num_canaries, confidence)
    total = num_canaries if needed is None else max(total, needed)
  return total - total // 2, total // 2


def canary_audit(canaries: GradientCanaries, final_params, delta: float,
                 guesses_per_side: int | None = None,
                 claimed_epsilon: float | None = None) -> dict[str, Any]:
  """The one-run audit of the released parameters: lower bound, its attainable maximum and,
  with `claimed_epsilon` (the ledger's epsilon at `delta`), whether the audit can test that
  claim and its verdict. `guesses_per_side` None: `choose_guesses`."""
  flat, _ = jax.flatten_util.ravel_pytree(final_params)
  scores = np.asarray(flat)[canaries.coordinates] - canaries.initial_values
  if guesses_per_side is None:
    k_pos, k_neg = choose_guesses(len(scores), claimed_epsilon, delta)
  else:
    k_pos = k_neg = guesses_per_side
  return {'canaries': 'white-box Dirac gradient canaries (Steinke et al. 2023)',
          **one_run.audit_from_scores(scores, canaries.included, delta, k_pos, k_neg,
                                      claimed_epsilon=claimed_epsilon)}
