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

Chain them FIRST, in front of an ordinary optimiser. :func:`dp_sgd` takes the
per-example gradients wrapped with their padding mask in :class:`PerExampleGrads`:
a transformation chained before it cannot silently change them (it fails on the
wrapper instead), and a wrapper that drops extra arguments (flax's
``TrainState.apply_gradients``) cannot drop the mask:

>>> import jax, jax.numpy as jnp, optax
>>> tx = optax.chain(
...     dp_sgd(1.0, noise_multiplier=0.0,
...            key=jax.random.key(0),  # a test key: use a secret one
...            expected_batch_size=2),
...     optax.sgd(learning_rate=1.0))
>>> params = {'w': jnp.zeros(2)}
>>> state = tx.init(params)
>>> per_example_grads = {'w': jnp.array([[3.0, 4.0], [1e9, 1e9]])}
>>> updates, state = tx.update(
...     PerExampleGrads(per_example_grads, mask=jnp.array([True, False])), state, params)
>>> [round(v, 4) for v in updates['w'].tolist()]  # -[0.6, 0.8] / 2
[-0.3, -0.4]
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import clipping
from dpjax import hyperparameters

PyTree = Any


class PerExampleGrads(NamedTuple):
  """What :func:`dp_sgd` takes: per-example gradients and which rows are real.

  Attributes:
    grads: a pytree shaped like the params with the example axis first,
      ``[batch, *param.shape]`` per leaf (e.g. ``jax.vmap(jax.grad(loss))``).
    mask: optional bool ``[batch]``: False marks padding rows (they contribute
      exactly zero); None means every row is a real example.

  A distinct pytree node: optax transformations chained before :func:`dp_sgd`
  fail on it (``add_decayed_weights`` cannot match it to the params) instead of
  changing every example's gradient, and the mask travels with the gradients.
  """

  grads: PyTree
  mask: jax.Array | None = None


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
    clip_stats: None, unless ``return_clip_stats=True``: then the
      :class:`dpjax.clipping.ClipStats` of the LAST update (``.fraction_clipped``,
      ``.mean_norm``). Statistics of private data, NOT covered by the DP
      guarantee; off by default so that optimizer-state checkpoints hold none.
  """

  count: jax.Array
  key: jax.Array
  clip_stats: clipping.ClipStats | None = None


def _check_hyperparameters(l2_norm_clip, noise_multiplier, expected_batch_size):
  """(C, z, E) as Python floats, checked for every scalar type (Python, NumPy, JAX).

  NaN, negative or infinite noise, a clip norm <= 0 or NaN, and an expected batch size that is
  not a finite positive number are refused: each would add less noise than the guarantee
  assumes (NaN z gives std 0 under jnp.where) or make the update meaningless. C = inf (no
  clipping) is allowed only without noise, where it is a useful reference.
  """
  clip = hyperparameters.concrete_scalar('l2_norm_clip', l2_norm_clip, minimum=0.0,
                                         strictly_greater=True, allow_inf=True)
  noise = hyperparameters.concrete_scalar('noise_multiplier', noise_multiplier, minimum=0.0)
  batch = hyperparameters.concrete_scalar('expected_batch_size', expected_batch_size,
                                          minimum=0.0, strictly_greater=True)
  if math.isinf(clip) and noise > 0:
    raise ValueError(f'l2_norm_clip=inf with noise_multiplier={noise:g}: the noise std z*C is '
                     'infinite; clip to a finite norm (C = inf only makes sense without noise)')
  return clip, noise, batch


def _as_key(key) -> jax.Array:
  """A typed PRNG key from a key (typed or raw) or an int seed; bools are refused."""
  if isinstance(key, (bool, np.bool_)) or (hasattr(key, 'dtype') and key.dtype == np.bool_):
    raise ValueError(f'Expected a secret JAX PRNG key, got the bool {key!r}')
  if isinstance(key, jax.core.Tracer) and not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    raise ValueError('Expected a typed JAX PRNG key (jax.random.key), got a traced raw value')
  if isinstance(key, int):
    return jax.random.key(key)
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  if key.dtype != jnp.uint32:
    raise ValueError(f'Expected a JAX PRNG key (typed, or raw uint32 key data), got dtype '
                     f'{key.dtype} of shape {key.shape}')
  return jax.random.wrap_key_data(key)


def _noisy_mean(clipped_sum, count, *, l2_norm_clip, noise_multiplier, key,
                expected_batch_size):
  """(clipped_sum + N(0, (zC)^2 I)) / E; key fold_in(key, t)."""
  step_key = jax.random.fold_in(key, count)
  standard_normal = optax.tree_utils.tree_random_like(
      step_key, clipped_sum, sampler=jax.random.normal, dtype=jnp.float32)
  # Python floats, checked at construction; z = 0 means no noise even with C = inf.
  noise_std = noise_multiplier * l2_norm_clip if noise_multiplier > 0 else 0.0

  def noisy_leaf(leaf_sum, leaf_noise):
    noisy = leaf_sum.astype(jnp.float32) + noise_std * leaf_noise
    return (noisy / expected_batch_size).astype(leaf_sum.dtype)

  return jax.tree.map(noisy_leaf, clipped_sum, standard_normal)


def gaussian_noise(
    l2_norm_clip: float,
    *,
    noise_multiplier: float,
    key: jax.Array | int,
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
  l2_norm_clip, noise_multiplier, expected_batch_size = _check_hyperparameters(
      l2_norm_clip, noise_multiplier, expected_batch_size)
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


def _check_per_example(updates, params) -> PerExampleGrads:
  """The trace-time checks of :func:`dp_sgd`'s input; errors say what was passed."""
  if not isinstance(updates, PerExampleGrads):
    raise ValueError(
        f'dp_sgd expects dpjax.PerExampleGrads(per_example_grads, mask), got '
        f'{type(updates).__name__}. Raw gradients could be changed unnoticed by a '
        'transformation chained before dp_sgd (optax.chain(add_decayed_weights(...), '
        "dp_sgd(...)) broadcasts the params into every example's gradient), and a wrapper "
        "such as flax's TrainState.apply_gradients drops a separate mask argument")
  if params is None:
    raise ValueError('dp_sgd needs the params (tx.update(grads, state, params)) to check that '
                     'the gradients are per-example, [batch, *param.shape] per leaf')
  grads_tree, params_tree = jax.tree.structure(updates.grads), jax.tree.structure(params)
  if grads_tree != params_tree:
    raise ValueError(f'dp_sgd: the per-example gradients have structure {grads_tree}, the '
                     f'params {params_tree}')
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  batch_sizes = set()
  for (path, param), leaf in zip(paths, jax.tree.leaves(updates.grads)):
    shape, want = jnp.shape(leaf), jnp.shape(param)
    if len(shape) != len(want) + 1 or tuple(shape[1:]) != tuple(want):
      raise ValueError(
          f'dp_sgd expects per-example gradients [batch, *param.shape]; got shape {shape} '
          f'for parameter {jax.tree_util.keystr(path)} of shape {want} (a mean gradient, or '
          'params broadcast into it by a transformation chained before dp_sgd?)')
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise ValueError(f'dp_sgd expects floating-point gradients; got dtype '
                       f'{jnp.result_type(leaf)} for parameter {jax.tree_util.keystr(path)}')
    batch_sizes.add(shape[0])
  if len(batch_sizes) > 1:
    raise ValueError(f'dp_sgd: the leaves disagree on the batch size: {sorted(batch_sizes)}')
  mask, batch = updates.mask, next(iter(batch_sizes), None)
  if mask is not None:
    if jnp.shape(mask) != (batch,):
      raise ValueError(f'dp_sgd: mask of shape {jnp.shape(mask)} for per-example gradients of '
                       f'batch size {batch}')
    if jnp.result_type(mask) != jnp.bool_:
      raise ValueError(f'dp_sgd: the mask must be bool, got {jnp.result_type(mask)} (was it '
                       'scaled by a transformation chained before dp_sgd?)')
  return updates


def dp_sgd(
    l2_norm_clip: float,
    *,
    noise_multiplier: float,
    key: jax.Array | int,
    expected_batch_size: float,
    return_clip_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """DP-SGD gradient privatisation: clip per example, sum, add noise, normalise.

  Use as ``optax.chain(dp_sgd(...), optax.sgd(...))`` and call
  ``tx.update(PerExampleGrads(per_example_grads, mask), state, params)``.

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
    return_clip_stats: keep the :class:`dpjax.clipping.ClipStats` of the last
      update in the state (statistics of private data, not covered by the
      guarantee; off by default so that checkpoints of the state hold none).

  Returns:
    An optax ``GradientTransformationExtraArgs``. Its update takes a
    :class:`PerExampleGrads` and the params (used to check, at trace time,
    that every leaf is ``[batch, *param.shape]`` and floating point); padding
    rows (mask False) contribute exactly zero, and so does a real example whose
    gradient norm is not finite (NaN, inf, float32 overflow; counted in
    ``ClipStats.num_nonfinite``): zero lies in the clip ball, the sensitivity
    stays C. The state is a :class:`DpSgdState`.

  The hyperparameters may be Python, NumPy or concrete JAX numbers (one
  element); NaN, negative or infinite z, C <= 0, C = inf with z > 0, a bool,
  and a traced value (built inside ``jit``) are refused with a ValueError.

  .. warning::
    Put ``dp_sgd`` FIRST in the chain: a transformation before it would see
    per-example gradients (and fails on :class:`PerExampleGrads` by design).
    Weight decay, momentum and learning rates belong after it.

  .. warning::
    The gradients must be per-example with no interaction between examples
    (no BatchNorm in training mode), the mask must mark every padding row
    (samplers put an out-of-range index there, so a gather that ignores the
    mask fails), the batches must be drawn as the accountant assumes
    (:class:`dpjax.sampling.PoissonSampler` for ``PoissonSampledDpEvent``), and
    the key must be secret. Any of these broken, the guarantee is void.

  Formal guarantees:
    Under add/remove-one adjacency the clipped sum has L2 sensitivity C, so
    each update is the Gaussian mechanism with noise multiplier z. With
    Poisson sampling at rate q (:class:`dpjax.sampling.PoissonSampler`), each
    step is the sampled Gaussian mechanism, ``PoissonSampledDpEvent(q,
    GaussianDpEvent(z))`` in dp-accounting, composed over the steps taken
    (:class:`dpjax.accounting.PrivacyLedger`).

  References:
    Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
  """
  l2_norm_clip, noise_multiplier, expected_batch_size = _check_hyperparameters(
      l2_norm_clip, noise_multiplier, expected_batch_size)
  key = _as_key(key)

  def init_fn(params):
    del params
    return DpSgdState(count=jnp.zeros((), jnp.int32), key=key,
                      clip_stats=clipping.ClipStats.zeros() if return_clip_stats else None)

  def update_fn(updates, state, params=None, **extra_args):
    if 'mask' in extra_args:
      raise ValueError('dp_sgd: pass the mask inside PerExampleGrads(grads, mask), not as an '
                       'extra argument (wrappers can drop extra arguments)')
    per_example = _check_per_example(updates, params)
    clipped_sum, clip_stats = clipping.clip_and_sum(per_example.grads, l2_norm_clip,
                                                    per_example.mask)
    noisy = _noisy_mean(
        clipped_sum, state.count, l2_norm_clip=l2_norm_clip,
        noise_multiplier=noise_multiplier, key=state.key,
        expected_batch_size=expected_batch_size)
    return noisy, DpSgdState(count=optax.safe_int32_increment(state.count), key=state.key,
                             clip_stats=clip_stats if return_clip_stats else None)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
