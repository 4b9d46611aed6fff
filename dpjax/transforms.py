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

Keys. The key must be secret (:func:`dpjax.fresh_secret_key`); integer seeds are
refused unless ``allow_int_key_for_testing=True``. The state holds the noise
stream key ``noise_stream_key(key) = fold_in(key, NOISE_DOMAIN_TAG)``
(:mod:`dpjax.secret_keys`) and update t draws from ``fold_in(state.key, t)``:
fresh per step, reproducible from (key, t), and unrelated to a sampler's stream
even when the caller gave the sampler the same key (the samplers fold in another
tag). The noise repeats whenever (key, t) repeats: a second ``tx.init`` (or a
second transformation with the same key) restarts at t = 0 with the SAME noise,
which cancels in the difference of two models trained so. Resume a run from its
saved state; start a new run with a new secret key. ``init`` warns when it is
called again on one transformation.

Chain them FIRST, in front of an ordinary optimiser. :func:`dp_sgd` takes the
per-example gradients wrapped with their padding mask in :class:`PerExampleGrads`
(from a sampler's batch: ``PerExampleGrads.from_batch(grads, batch)``): a
transformation chained before it cannot silently change them (it fails on the
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
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dpjax import clipping
from dpjax import hyperparameters
from dpjax import noise
from dpjax import sampling
from dpjax import secret_keys

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

  For a sampler's batch build it with :meth:`from_batch`, which takes the mask
  from the :class:`dpjax.sampling.PaddedBatch`: raw gradients carry no sign of
  padding, so :func:`dp_sgd` cannot tell a forgotten mask from a full batch.
  (A ``PaddedBatch`` given as ``mask`` is accepted too.)
  """

  grads: PyTree
  mask: jax.Array | None = None

  @classmethod
  def from_batch(cls, grads: PyTree, batch: sampling.PaddedBatch) -> PerExampleGrads:
    """The per-example gradients of ``batch``'s rows, with its mask (the safe path)."""
    if not isinstance(batch, sampling.PaddedBatch):
      raise ValueError(f'PerExampleGrads.from_batch expects the dpjax.sampling.PaddedBatch the '
                       f'rows were gathered with (sampler.batch(step)), got {type(batch).__name__}')
    return cls(grads, batch.mask)


class GaussianNoiseState(NamedTuple):
  """State of :func:`gaussian_noise`.

  Attributes:
    count: number of updates done so far (the noise key index).
    key: the secret noise stream key, ``secret_keys.noise_stream_key(key)`` of the
      key the transformation was built with (already domain-separated; update t
      uses ``fold_in(state.key, t)``). It lives in the state (as in optax's
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
    key: the secret noise stream key (see :class:`GaussianNoiseState`).
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


def _noise_key(key, allow_int_key_for_testing: bool) -> jax.Array:
  """The state's noise stream key: the checked key (an int seed only with the testing flag)
  folded into the noise domain, so that a sampler given the same key draws unrelated bits."""
  return secret_keys.noise_stream_key(secret_keys.as_secret_key(
      key, allow_int_key_for_testing=allow_int_key_for_testing))


def _init_guard(name: str):
  """Counts concrete ``init`` calls of one transformation; warns from the second on.

  A second state starts the same noise stream at update 0 again. Traced calls
  (``jax.eval_shape(tx.init, ...)`` for shapes, a jitted init) are not counted.
  """
  calls = 0

  def note(count: jax.Array) -> None:
    nonlocal calls
    if isinstance(count, jax.core.Tracer):
      return
    calls += 1
    if calls > 1:
      warnings.warn(
          f'{name}: init was called again on the same transformation. The new state restarts '
          'the noise stream at update 0: its updates get the SAME noise as the first state\'s, '
          'and two models trained so cancel each other\'s noise in a difference. Resume from '
          'the saved state, or build a new transformation with a fresh secret key for a new '
          'run.', UserWarning, stacklevel=3)

  return note


def _noisy_mean(clipped_sum, count, *, l2_norm_clip, noise_multiplier, key,
                expected_batch_size):
  """(clipped_sum + N(0, (zC)^2 I)) / E; key fold_in(key, t).

  The normals come from :func:`dpjax.noise.standard_normal`, not float32
  ``jax.random.normal``: the latter stops at 5.22 standard deviations, so the neighbour's
  output lands where this data set's cannot with probability 9e-6 per step at z = 1.07;
  with the former the truncation costs at most ``noise.truncation_delta`` (1.8e-14 for one
  coordinate at z = 0.5 over 10^6 steps).
  """
  step_key = jax.random.fold_in(key, count)
  standard_normal = optax.tree_utils.tree_random_like(
      step_key, clipped_sum, sampler=noise.standard_normal, dtype=jnp.float32)
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
    allow_int_key_for_testing: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Adds Gaussian noise to an already clipped gradient SUM and normalises.

  Args:
    l2_norm_clip: the clip norm C the incoming sum was clipped with.
    noise_multiplier: z; the noise standard deviation is z * C.
    key: a SECRET JAX PRNG key (typed, or raw uint32 key data); update t
      uses ``fold_in(noise_stream_key(key), t)`` (:mod:`dpjax.secret_keys`).
      Whoever knows it can subtract the noise: draw it from OS entropy
      (:func:`dpjax.secret_keys.fresh_secret_key`), one per run.
    expected_batch_size: the constant the noisy sum is divided by: q * N for
      Poisson sampling, the batch size for fixed-size batches.
    allow_int_key_for_testing: accept an integer seed as ``key`` (it becomes
      ``jax.random.key(seed)``). For tests only: a seed is public, and the
      guarantee is void against anyone who knows it. Refused by default.

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
    a constant is post-processing. The normals come from
    :func:`dpjax.noise.standard_normal`, whose tails end at 11.6 sigma: that costs at
    most :func:`dpjax.noise.truncation_delta` more delta (about 1e-14 for a million steps),
    not counted by the accountant; the float32 rounding of sum + noise is not modelled.

  References:
    Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
  """
  l2_norm_clip, noise_multiplier, expected_batch_size = _check_hyperparameters(
      l2_norm_clip, noise_multiplier, expected_batch_size)
  key = _noise_key(key, allow_int_key_for_testing)
  note_init = _init_guard('gaussian_noise')

  def init_fn(params):
    del params
    count = jnp.zeros((), jnp.int32)
    note_init(count)
    return GaussianNoiseState(count=count, key=key)

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
    if type(updates).__module__.startswith('flax.nnx'):  # nnx.state(...) of the wrapper.
      raise ValueError(
          f'dp_sgd expects dpjax.PerExampleGrads(per_example_grads, mask), got '
          f'{type(updates).__name__}: flax nnx.Optimizer.update passes the gradients through '
          'nnx.state(grads, wrt), which strips the PerExampleGrads wrapper and drops the '
          'mask. Call dpjax.transforms.nnx_update(optimizer, model, '
          'PerExampleGrads.from_batch(grads, batch)) instead of optimizer.update, or '
          'tx.update(PerExampleGrads(...), opt_state, params) without nnx.Optimizer '
          '(docs/USING_DP_SGD.md, "flax NNX")')
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
  if isinstance(mask, sampling.PaddedBatch):  # PerExampleGrads(grads, batch): its mask.
    mask = mask.mask
    updates = updates._replace(mask=mask)
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
    allow_int_key_for_testing: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """DP-SGD gradient privatisation: clip per example, sum, add noise, normalise.

  Use as ``optax.chain(dp_sgd(...), optax.sgd(...))`` and call
  ``tx.update(PerExampleGrads.from_batch(per_example_grads, batch), state, params)``
  with the rows gathered by ``batch.gather`` from ``batch = sampler.batch(t)``
  (or ``PerExampleGrads(per_example_grads, mask)``).

  Args:
    l2_norm_clip: C; each example's whole-model gradient (global norm over
      the pytree) is scaled to L2 norm <= C.
    noise_multiplier: z; Gaussian noise of standard deviation z * C is added
      to every coordinate of the clipped sum, once per update.
    key: a SECRET JAX PRNG key (typed, or raw uint32 key data); update t
      uses ``fold_in(noise_stream_key(key), t)`` (:mod:`dpjax.secret_keys`),
      a stream separate from any sampler's, even one given the same key.
      Whoever knows it can subtract the noise: draw it from OS entropy
      (:func:`dpjax.secret_keys.fresh_secret_key`), one per run.
    expected_batch_size: the constant the noisy sum is divided by: q * N for
      Poisson sampling (NOT the realised batch size, which is private), the
      batch size for fixed-size batches.
    return_clip_stats: keep the :class:`dpjax.clipping.ClipStats` of the last
      update in the state (statistics of private data, not covered by the
      guarantee; off by default so that checkpoints of the state hold none).
    allow_int_key_for_testing: accept an integer seed as ``key`` (it becomes
      ``jax.random.key(seed)``). For tests only: a seed is public, and the
      guarantee is void against anyone who knows it. Refused by default.

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
  and a traced value (built inside ``jit``) are refused with a ValueError, and
  so is an integer ``key`` (without ``allow_int_key_for_testing``).

  .. warning::
    Put ``dp_sgd`` FIRST in the chain: a transformation before it would see
    per-example gradients (and fails on :class:`PerExampleGrads` by design).
    Weight decay, momentum and learning rates belong after it.

  .. warning::
    The gradients must be per-example with no interaction between examples
    (no BatchNorm in training mode), the mask must mark every padding row
    (use :meth:`PerExampleGrads.from_batch`; raw gradients carry no sign of
    padding, so a forgotten mask cannot be detected here), the batches must be
    drawn as the accountant assumes (:class:`dpjax.sampling.PoissonSampler` for
    ``PoissonSampledDpEvent``), and the key must be secret and used for one
    run only (a second ``init``, or a second run with the same key, repeats
    the noise). Any of these broken, the guarantee is void. Gather rows with
    :meth:`dpjax.sampling.PaddedBatch.gather`: its padding rows are zeros, so
    even a forgotten mask counts no example twice (an aliasing gather such as
    ``np.where(mask, indices, 0)``, or ``jnp`` indexing, which clamps the
    padding index, counts one example once per padding row).

  Formal guarantees:
    Under add/remove-one adjacency the clipped sum has L2 sensitivity C, so
    each update is the Gaussian mechanism with noise multiplier z. With
    Poisson sampling at rate q (:class:`dpjax.sampling.PoissonSampler`), each
    step is the sampled Gaussian mechanism, ``PoissonSampledDpEvent(q,
    GaussianDpEvent(z))`` in dp-accounting, composed over the steps taken
    (:class:`dpjax.accounting.PrivacyLedger`). Floating point: as for
    :func:`gaussian_noise` (:func:`dpjax.noise.truncation_delta`).

  References:
    Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
  """
  l2_norm_clip, noise_multiplier, expected_batch_size = _check_hyperparameters(
      l2_norm_clip, noise_multiplier, expected_batch_size)
  key = _noise_key(key, allow_int_key_for_testing)
  note_init = _init_guard('dp_sgd')

  def init_fn(params):
    del params
    count = jnp.zeros((), jnp.int32)
    note_init(count)
    return DpSgdState(count=count, key=key,
                      clip_stats=clipping.ClipStats.zeros() if return_clip_stats else None)

  def update_fn(updates, state, params=None, **extra_args):
    if 'mask' in extra_args or any(isinstance(v, sampling.PaddedBatch)
                                   for v in extra_args.values()):
      raise ValueError('dp_sgd: pass the mask inside PerExampleGrads(grads, mask) (from a '
                       'batch: PerExampleGrads.from_batch(grads, batch)), not as an extra '
                       'argument (wrappers can drop extra arguments)')
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


def nnx_update(optimizer, model, per_example_grads: PerExampleGrads, /, **kwargs) -> PyTree:
  """``optimizer.update(model, grads)`` for a flax ``nnx.Optimizer`` whose tx starts with dp_sgd.

  ``nnx.Optimizer.update`` filters the gradients with ``nnx.state(grads, wrt)``, which strips
  the :class:`PerExampleGrads` wrapper and its mask (dp_sgd then refuses the bare ``State``).
  This does what that method does (flax 0.11+: ``tx.update``, ``optax.apply_updates``, write
  the params and the optimizer state back, ``step += 1``) with the wrapper kept:

  >>> import jax, jax.numpy as jnp, optax
  >>> from flax import nnx
  >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  >>> optimizer = nnx.Optimizer(model, optax.chain(
  ...     dp_sgd(1.0, noise_multiplier=0.0, key=jax.random.key(0),  # a test key
  ...            expected_batch_size=2), optax.sgd(1.0)), wrt=nnx.Param)
  >>> graphdef, params = nnx.split(model, nnx.Param)
  >>> loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x))  # ONE example
  >>> grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, jnp.ones((3, 2)))
  >>> _ = nnx_update(optimizer, model,
  ...                PerExampleGrads(grads, mask=jnp.array([True, True, False])))
  >>> int(optimizer.step[...])
  1

  Args:
    optimizer: an ``nnx.Optimizer(model, tx, wrt=...)`` whose ``tx`` has :func:`dp_sgd` first.
    model: the module the optimizer was built for.
    per_example_grads: :class:`PerExampleGrads` whose ``grads`` are shaped like
      ``nnx.state(model, wrt)`` with the example axis first (e.g. ``jax.vmap(jax.grad(loss))``
      over the params of ``nnx.split(model, nnx.Param)``; Variables or plain arrays).
    **kwargs: extra arguments for ``tx.update`` (a mask here is refused by dp_sgd).

  Returns:
    The updates applied (the params' structure), as ``nnx.Optimizer.update`` returns.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top  # flax NNX users only.

  if not isinstance(per_example_grads, PerExampleGrads):
    raise ValueError(f'nnx_update expects dpjax.PerExampleGrads(per_example_grads, mask), got '
                     f'{type(per_example_grads).__name__}')
  wrt, graph = optimizer.wrt, getattr(optimizer, 'graph', None)
  state_kwargs = {} if graph is None else {'graph': graph}
  param_arrays = nnx.as_pure(nnx.state(model, wrt, **state_kwargs))
  grads = per_example_grads._replace(grads=nnx.as_pure(per_example_grads.grads))
  updates, new_opt_state = optimizer.tx.update(
      grads, nnx.as_pure(optimizer.opt_state), param_arrays, **nnx.as_pure(kwargs))
  nnx.update(model, optax.apply_updates(param_arrays, updates))
  nnx.update(optimizer.opt_state, nnx.state(new_opt_state, **state_kwargs))
  optimizer.step[...] += 1
  return updates
