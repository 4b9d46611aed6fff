"""DP-SGD as optax gradient transformations.

Two entry points share one noise code path:

* :func:`dp_sgd` takes per-example gradients (example axis first), clips and
  sums them with :func:`dpjax.clipping.clip_and_sum`, then adds noise.
* :func:`gaussian_noise` takes an already clipped SUM (e.g. from
  :func:`dpjax.clipping.clipped_grad_sum`, which scans a large logical batch in
  chunks) and adds the same noise.

Both add N(0, (z C)^2) independently to every coordinate ONCE per update
(one update = one logical batch) and divide by the EXPECTED batch size, a
constant, so the normalisation reveals nothing about the realised batch size.
The noise key of update t is ``jax.random.fold_in(key, t)``: fresh per step,
reproducible from (key, t). Use a key that is not used for anything else
(in particular not for batch sampling).

Chain them in front of an ordinary optimiser; ``mask`` flows through
``optax.chain`` as an extra argument:

>>> import jax, jax.numpy as jnp, optax
>>> tx = optax.chain(
...     dp_sgd(l2_norm_clip=1.0, noise_multiplier=0.0,
...            key=jax.random.key(0),  # a test key: use a secret one
...            expected_batch_size=2),
...     optax.sgd(learning_rate=1.0))
>>> params = {'w': jnp.zeros(2)}
>>> state = tx.init(params)
>>> per_example_grads = {'w': jnp.array([[3.0, 4.0], [1e9, 1e9]])}
>>> updates, state = tx.update(per_example_grads, state, params,
...                            mask=jnp.array([True, False]))
>>> [round(v, 4) for v in updates['w'].tolist()]  # -[0.6, 0.8] / 2
[-0.3, -0.4]
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dpjax import clipping

PyTree = Any


class GaussianNoiseState(NamedTuple):
  """State of :func:`gaussian_noise`.

  Attributes:
    count: number of updates done so far (the noise key index).
    key: the secret noise key. It lives in the state (as in optax's
      ``differentially_private_aggregate``) so that a checkpoint of the optimizer
      state resumes the same noise stream; such a checkpoint is therefore as
      private as the key.
  """

  count: jax.Array
  key: jax.Array


class DpSgdState(NamedTuple):
  """State of :func:`dp_sgd`.

  Attributes:
    count: number of updates done so far (the noise key index).
    key: the secret noise key (see :class:`GaussianNoiseState`).
    clip_stats: :class:`dpjax.clipping.ClipStats` of the LAST update, for
      logging (``.fraction_clipped``, ``.mean_norm``). Statistics of private
      data: log them for debugging, they are not covered by the DP guarantee.
  """

  count: jax.Array
  key: jax.Array
  clip_stats: clipping.ClipStats


def _check_hyperparameters(l2_norm_clip, noise_multiplier, expected_batch_size):
  if isinstance(l2_norm_clip, (int, float)) and not l2_norm_clip > 0:
    raise ValueError(f'Expected {l2_norm_clip=} > 0')
  if isinstance(noise_multiplier, (int, float)) and not noise_multiplier >= 0:
    raise ValueError(f'Expected {noise_multiplier=} >= 0')
  if isinstance(expected_batch_size, (int, float)) and (
      not expected_batch_size > 0):
    raise ValueError(f'Expected {expected_batch_size=} > 0')


def _as_key(key) -> jax.Array:
  """A typed PRNG key from a key (typed or raw) or an int seed."""
  if isinstance(key, int):
    return jax.random.key(key)
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  return jax.random.wrap_key_data(key)


def _noisy_mean(clipped_sum, count, *, l2_norm_clip, noise_multiplier, key,
                expected_batch_size):
  """(clipped_sum + N(0, (zC)^2 I)) / E; key fold_in(key, t)."""
  step_key = jax.random.fold_in(key, count)
  standard_normal = optax.tree_utils.tree_random_like(
      step_key, clipped_sum, sampler=jax.random.normal, dtype=jnp.float32)
  # z = 0 means no noise even with C = inf (where 0 * inf would give NaN).
  noise_std = jnp.where(noise_multiplier > 0,
                        noise_multiplier * jnp.float32(l2_norm_clip), 0.0)

  def noisy_leaf(leaf_sum, leaf_noise):
    noisy = leaf_sum.astype(jnp.float32) + noise_std * leaf_noise
    return (noisy / expected_batch_size).astype(leaf_sum.dtype)

  return jax.tree.map(noisy_leaf, clipped_sum, standard_normal)


def gaussian_noise(
    l2_norm_clip: float,
    noise_multiplier: float,
    key: jax.Array,
    expected_batch_size: float,
) -> optax.GradientTransformationExtraArgs:
  """Adds Gaussian noise to an already clipped gradient SUM and normalises.

  Args:
    l2_norm_clip: the clip norm C the incoming sum was clipped with.
    noise_multiplier: z; the noise standard deviation is z * C.
    key: a SECRET JAX PRNG key (or int seed) reserved for this noise;
      update t uses ``fold_in(key, t)``. Whoever knows it can subtract the
      noise: draw it from OS entropy (:func:`dpjax.secret_keys.fresh_secret_key`).
    expected_batch_size: the constant the noisy sum is divided by: q * N for
      Poisson sampling, the batch size for fixed-size batches.

  Returns:
    An optax ``GradientTransformationExtraArgs`` mapping the clipped sum to
    ``(sum + N(0, (zC)^2 I)) / expected_batch_size``. Extra arguments are
    accepted and ignored.

  .. warning::
    The input must be a SUM of per-example gradients each clipped to norm <=
    C (e.g. from :func:`dpjax.clipping.clipped_grad_sum`), not a mean and not
    a sum of clipped microbatch means; otherwise the noise is miscalibrated.

  Formal guarantees:
    If the input has L2 sensitivity C to adding or removing one example, each
    update is the Gaussian mechanism with noise multiplier z (and, with
    Poisson sampling at rate q, the sampled Gaussian mechanism); dividing by
    a constant is post-processing.

  References:
    Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
  """
  _check_hyperparameters(l2_norm_clip, noise_multiplier, expected_batch_size)

  key = _as_key(key)

  def init_fn(params):
    del params
    return GaussianNoiseState(count=jnp.zeros((), jnp.int32), key=key)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    noisy = _noisy_mean(
        updates, state.count, l2_norm_clip=l2_norm_clip,
        noise_multiplier=noise_multiplier, key=state.key,
        expected_batch_size=expected_batch_size)
    return noisy, state._replace(count=optax.safe_int32_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dp_sgd(
    l2_norm_clip: float,
    noise_multiplier: float,
    key: jax.Array,
    expected_batch_size: float,
) -> optax.GradientTransformationExtraArgs:
  """DP-SGD gradient privatisation: clip per example, sum, add noise, normalise.

  Use as ``optax.chain(dp_sgd(...), optax.sgd(...))`` and call
  ``tx.update(per_example_grads, state, params, mask=mask)``.

  Args:
    l2_norm_clip: C; each example's whole-model gradient (global norm over
      the pytree) is scaled to L2 norm <= C.
    noise_multiplier: z; Gaussian noise of standard deviation z * C is added
      to every coordinate of the clipped sum, once per update.
    key: a SECRET JAX PRNG key (or int seed) reserved for this noise;
      update t uses ``fold_in(key, t)``. Whoever knows it can subtract the
      noise: draw it from OS entropy (:func:`dpjax.secret_keys.fresh_secret_key`).
    expected_batch_size: the constant the noisy sum is divided by: q * N for
      Poisson sampling (NOT the realised batch size, which is private), the
      batch size for fixed-size batches.

  Returns:
    An optax ``GradientTransformationExtraArgs``. Its update takes per-example
    gradients and an optional extra argument ``mask`` (bool ``[batch]``,
    False for padding rows, which then contribute exactly zero). The state is
    a :class:`DpSgdState` whose ``clip_stats`` describe the last update.

  .. warning::
    The input must be per-example gradients with the example axis FIRST
    (axis 0 of every leaf), e.g. from ``jax.vmap(jax.grad(loss))``. Passing a
    batch-averaged gradient silently breaks the guarantee.

  Formal guarantees:
    Under add/remove-one adjacency the clipped sum has L2 sensitivity C, so
    each update is the Gaussian mechanism with noise multiplier z. With
    Poisson sampling at rate q (:class:`dpjax.sampling.PoissonSampler`), each
    step is the sampled Gaussian mechanism, ``PoissonSampledDpEvent(q,
    GaussianDpEvent(z))`` in dp-accounting, composed over the steps taken
    (:class:`dpjax.accounting.PrivacyLedger`). This holds only if the
    per-example gradients do not depend on other examples.

  References:
    Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
  """
  _check_hyperparameters(l2_norm_clip, noise_multiplier, expected_batch_size)

  key = _as_key(key)

  def init_fn(params):
    del params
    return DpSgdState(count=jnp.zeros((), jnp.int32), key=key,
                      clip_stats=clipping.ClipStats.zeros())

  def update_fn(updates, state, params=None, *, mask=None, **extra_args):
    del params, extra_args
    clipped_sum, clip_stats = clipping.clip_and_sum(updates, l2_norm_clip, mask)
    noisy = _noisy_mean(
        clipped_sum, state.count, l2_norm_clip=l2_norm_clip,
        noise_multiplier=noise_multiplier, key=state.key,
        expected_batch_size=expected_batch_size)
    return noisy, DpSgdState(count=optax.safe_int32_increment(state.count),
                             key=state.key, clip_stats=clip_stats)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
