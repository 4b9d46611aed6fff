"""Per-example gradient clipping: the sensitivity-bounding half of DP-SGD.

Every function here returns a *clipped sum*: each example's whole-model
gradient (one pytree) is scaled to global L2 norm at most ``l2_norm_clip``
and the results are added up. Adding or removing one example therefore moves
the sum by at most ``l2_norm_clip`` in L2 norm (replacing one moves it by at
most ``2 * l2_norm_clip``). Noise is added afterwards, once per logical batch,
by :func:`dpjax.transforms.gaussian_noise` or :func:`dpjax.transforms.dp_sgd`.

Padding: batches have fixed shapes (see :mod:`dpjax.sampling`), so some rows
are padding. ``mask`` marks the real examples; padded rows contribute exactly
zero to the sum and to the statistics, even when their gradient is NaN or
infinite (selected away with ``jnp.where``, never multiplied by zero).

Non-finite examples: a real example whose gradient norm is not finite (a NaN or
infinite entry, or entries so large that the float32 norm overflows) also
contributes exactly zero, and is counted in ``ClipStats.num_nonfinite``. Zero
lies inside the clip ball, so the sensitivity stays C, and one bad example can
neither turn the whole update into NaN nor stop the run.

Virtual (logical) batches larger than what fits in memory: pass the whole
logical batch to :func:`clipped_grad_sum` in one jitted call with
``microbatch_size`` set. It computes per-example gradients ``microbatch_size``
examples at a time inside a ``jax.lax.scan`` and accumulates the clipped sums,
so memory is bounded by one chunk while the result is exactly the clipped sum
of the whole logical batch. Then add noise ONCE with ``gaussian_noise``. (The
chunks are only a memory device: every example is still clipped on its own,
unlike clipping microbatch means, which doubles the sensitivity.)

>>> import jax.numpy as jnp
>>> grads = {'w': jnp.array([[3.0, 4.0], [0.3, 0.4]])}  # 2 examples
>>> clipped_sum, stats = clip_and_sum(grads, l2_norm_clip=1.0)
>>> [round(v, 4) for v in clipped_sum['w'].tolist()]  # [.6, .8] + [.3, .4]
[0.9, 1.2]
>>> int(stats.num_clipped), float(stats.mean_norm)
(1, 2.75)
"""

from __future__ import annotations

from typing import Any, NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dpjax import hyperparameters

PyTree = Any


class ClipStats(NamedTuple):
  """Clipping statistics as SUMS over real (unmasked) examples.

  Sums, not means, so that statistics of chunks or devices add up with
  ``jax.tree.map(jnp.add, a, b)``. Use the properties for the ratios.

  Attributes:
    num_examples: number of real examples seen.
    num_clipped: number of real examples whose norm exceeded the clip norm.
    sum_norms: sum of the pre-clipping global L2 norms of real examples with a finite norm.
    num_nonfinite: number of real examples whose norm was not finite (NaN or infinite
      entries, or float32 overflow); they contributed zero.
  """

  num_examples: jax.Array
  num_clipped: jax.Array
  sum_norms: jax.Array
  num_nonfinite: jax.Array

  @property
  def fraction_clipped(self) -> jax.Array:
    """Fraction of real examples that were clipped (0 when there are none)."""
    return self.num_clipped / jnp.maximum(self.num_examples, 1)

  @property
  def mean_norm(self) -> jax.Array:
    """Mean pre-clipping gradient norm of real examples with a finite norm (0 when none)."""
    return self.sum_norms / jnp.maximum(self.num_examples - self.num_nonfinite, 1)

  @classmethod
  def of_norms(cls, norms: jax.Array, is_real: jax.Array, l2_norm_clip) -> ClipStats:
    """Statistics of per-example norms ``[batch]``, counting only rows where `is_real`."""
    finite = jnp.isfinite(norms)
    counted = is_real & finite
    return cls(
        num_examples=jnp.sum(is_real, dtype=jnp.float32),
        num_clipped=jnp.sum(counted & (norms > l2_norm_clip), dtype=jnp.float32),
        sum_norms=jnp.sum(jnp.where(counted, norms, 0.0)),
        num_nonfinite=jnp.sum(is_real & ~finite, dtype=jnp.float32),
    )

  @classmethod
  def zeros(cls) -> ClipStats:
    zero = jnp.zeros((), jnp.float32)
    return cls(num_examples=zero, num_clipped=zero, sum_norms=zero, num_nonfinite=zero)


def clip_factors(norms: jax.Array, is_real: jax.Array, l2_norm_clip) -> jax.Array:
  """``min(1, C / norm)`` per row; exactly 0 for padding and for a non-finite norm.

  A zero norm gives C / 0 = inf -> factor 1; C = inf gives 1 for every finite norm.
  """
  finite = jnp.isfinite(norms)
  safe_norms = jnp.where(finite, norms, 1.0)
  return jnp.where(is_real & finite, jnp.minimum(1.0, l2_norm_clip / safe_norms), 0.0)


def checked_clip_norm(l2_norm_clip, name: str = 'l2_norm_clip'):
  """A concrete C checked (> 0, not NaN; inf allowed), or a traced C made NaN where invalid.

  A traced C cannot be refused before it runs; an invalid one (<= 0 or NaN) then poisons the
  clipped sum with NaN instead of silently clipping to a negative or zero norm.
  """
  if isinstance(l2_norm_clip, jax.core.Tracer):
    return jnp.where(l2_norm_clip > 0, l2_norm_clip, jnp.nan)
  return hyperparameters.concrete_scalar(name, l2_norm_clip, minimum=0.0,
                                         strictly_greater=True, allow_inf=True)


def check_floating(per_example_grads: PyTree, name: str) -> None:
  """Refuses integer or bool leaves: their clipped sum would silently be zero."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(per_example_grads)[0]:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise ValueError(f'Expected floating-point {name}; got dtype {jnp.result_type(leaf)} at '
                       f'{jax.tree_util.keystr(path) or "the root"}')


def _batch_size(per_example_tree: PyTree, name: str) -> int:
  leaves = jax.tree.leaves(per_example_tree)
  if not leaves:
    raise ValueError(f'Expected a non-empty pytree for {name}')
  sizes = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
        f'Expected every leaf of {name} to share the example axis 0, got'
        f' leading sizes {sorted(map(str, sizes))}')
  return sizes.pop()


def _real_example_mask(mask: jax.Array | None, batch_size: int) -> jax.Array:
  if mask is None:
    return jnp.ones((batch_size,), dtype=bool)
  mask = jnp.asarray(mask)
  if mask.shape != (batch_size,):
    raise ValueError(
        f'Expected mask.shape == ({batch_size},), got {mask.shape}')
  return mask.astype(bool)


def per_example_global_norms(per_example_grads: PyTree) -> jax.Array:
  """Global L2 norm of each example's gradient pytree, shape ``[batch]``.

  Computed in float32, or in float64 when a leaf is float64 (half precisions are upcast).
  """
  squared = [
      jnp.sum(jnp.square(leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32)))
              .reshape(leaf.shape[0], -1), axis=1)
      for leaf in jax.tree.leaves(per_example_grads)
  ]
  return jnp.sqrt(sum(squared))


def clip_and_sum(
    per_example_grads: PyTree,
    l2_norm_clip: float | jax.Array,
    mask: jax.Array | None = None,
) -> tuple[PyTree, ClipStats]:
  """Clips each example's whole-model gradient to norm <= C and sums them.

  Args:
    per_example_grads: pytree whose leaves have the example axis first,
      ``[batch, *param_shape]``.
    l2_norm_clip: the clip norm C > 0 (``jnp.inf`` disables clipping).
    mask: optional bool ``[batch]``; False marks padding rows, which contribute
      exactly zero (even if their gradient is NaN). None means all are real.
      A real row whose norm is not finite also contributes zero (counted in the stats).

  Returns:
    ``(clipped_sum, stats)``: a pytree shaped like one example's gradient
    (leaf dtypes kept), and :class:`ClipStats` over the real examples.

  Formal guarantees:
    For any two batches that differ by adding or removing one real example
    (or by flipping its mask), ``clipped_sum`` differs by at most C in global
    L2 norm; replacing one example moves it by at most 2C.
  """
  l2_norm_clip = checked_clip_norm(l2_norm_clip)
  check_floating(per_example_grads, 'per_example_grads')
  batch_size = _batch_size(per_example_grads, 'per_example_grads')
  is_real = _real_example_mask(mask, batch_size)

  norms = per_example_global_norms(per_example_grads)
  scale = clip_factors(norms, is_real, l2_norm_clip)
  kept_rows = is_real & jnp.isfinite(norms)

  def clipped_leaf_sum(leaf):
    row_shape = (batch_size,) + (1,) * (leaf.ndim - 1)
    scaled = leaf * scale.reshape(row_shape).astype(leaf.dtype)
    # where (not * 0): NaN * 0 is NaN; a padded or non-finite row must give exactly 0.
    kept = jnp.where(kept_rows.reshape(row_shape), scaled, jnp.zeros_like(leaf))
    return jnp.sum(kept, axis=0)

  clipped_sum = jax.tree.map(clipped_leaf_sum, per_example_grads)
  return clipped_sum, ClipStats.of_norms(norms, is_real, l2_norm_clip)


def clipped_grad_sum(
    loss_fn: Callable[[PyTree, PyTree], tuple[jax.Array, PyTree]],
    params: PyTree,
    batch: PyTree,
    mask: jax.Array | None,
    l2_norm_clip: float | jax.Array,
    microbatch_size: int | None = None,
) -> tuple[PyTree, ClipStats, PyTree]:
  """Clipped sum of per-example gradients of ``loss_fn`` over ``batch``.

  Args:
    loss_fn: ``loss_fn(params, example) -> (loss, aux)`` for ONE example: it is
      vmapped over the batch, so ``example`` is one row of ``batch`` (a pytree of
      arrays WITHOUT the batch axis) and ``loss`` a scalar. It must not mix examples
      (e.g. no BatchNorm in training mode), or per-example clipping is void. NOT the
      ``loss_fn`` of :func:`dpjax.ghost_clipped_grad_sum`, which takes the WHOLE batch
      and returns ``[batch]`` losses. For example::

        def loss_fn(params, example):  # x: [H, W, C], y: [] (no batch axis)
          x, y = example
          logits = model.apply(params, x[None])[0]  # add, then drop, a batch axis of 1
          return optax.softmax_cross_entropy_with_integer_labels(logits, y), logits
    params: the parameters to differentiate with respect to.
    batch: pytree of arrays with the example axis first, ``[batch, ...]``.
    mask: bool ``[batch]`` marking real examples (None: all real).
    l2_norm_clip: the clip norm C.
    microbatch_size: if set, compute per-example gradients this many examples
      at a time in a ``lax.scan`` (bounds memory); ``batch`` must be a multiple
      of it. The result equals the unchunked one.

  Returns:
    ``(grad_sum, stats, aux)``: the clipped gradient sum (params structure),
    :class:`ClipStats`, and ``aux`` stacked per example, ``[batch, ...]``
    (padded rows included; use ``mask`` when averaging).

  Formal guarantees:
    Same as :func:`clip_and_sum`: sensitivity C to adding/removing one example.
  """
  per_example_grad_fn = jax.vmap(
      jax.grad(loss_fn, has_aux=True), in_axes=(None, 0))

  def chunk_clipped_sum(chunk, chunk_mask):
    per_example_grads, aux = per_example_grad_fn(params, chunk)
    grad_sum, stats = clip_and_sum(per_example_grads, l2_norm_clip, chunk_mask)
    return grad_sum, stats, aux

  return accumulate_chunks(chunk_clipped_sum, batch, mask, microbatch_size)


def accumulate_chunks(
    chunk_clipped_sum: Callable[[PyTree, jax.Array], tuple[PyTree, ClipStats, PyTree]],
    batch: PyTree,
    mask: jax.Array | None,
    microbatch_size: int | None,
) -> tuple[PyTree, ClipStats, PyTree]:
  """Runs `chunk_clipped_sum(chunk, chunk_mask)` over microbatches and adds the results.

  Without `microbatch_size` (or with one >= the batch) it is one call on the whole batch.
  Otherwise a ``lax.scan`` over chunks of `microbatch_size` examples (the batch must be a
  multiple) bounds memory by one chunk; chunks of padding only are skipped. Clipped sums and
  statistics add up over chunks, per-example `aux` is concatenated back to ``[batch, ...]``.
  """
  batch_size = _batch_size(batch, 'batch')
  is_real = _real_example_mask(mask, batch_size)
  if microbatch_size is None or microbatch_size >= batch_size:
    if microbatch_size is not None and microbatch_size != batch_size:
      raise ValueError(
          f'Expected {batch_size=} to be a multiple of {microbatch_size=}')
    return chunk_clipped_sum(batch, is_real)

  if microbatch_size <= 0 or batch_size % microbatch_size:
    raise ValueError(
        f'Expected {batch_size=} to be a multiple of {microbatch_size=}')
  num_chunks = batch_size // microbatch_size

  def to_chunks(x):
    return x.reshape((num_chunks, microbatch_size) + x.shape[1:])

  chunks = jax.tree.map(to_chunks, batch)
  chunk_masks = to_chunks(is_real)

  # Zero carry with exactly the dtypes/shapes one chunk produces.
  sum_shapes, stats_shapes, aux_shapes = jax.eval_shape(
      chunk_clipped_sum,
      jax.tree.map(lambda x: x[0], chunks), chunk_masks[0])
  zeros = lambda s: jnp.zeros(s.shape, s.dtype)
  init = (jax.tree.map(zeros, sum_shapes), jax.tree.map(zeros, stats_shapes))

  def padding_only(chunk, chunk_mask):
    del chunk, chunk_mask
    return (*init, jax.tree.map(zeros, aux_shapes))

  def accumulate(carry, chunk_and_mask):
    # A chunk of padding only contributes exactly zero: skip its forward and backward
    # passes (fixed-shape Poisson batches carry several such chunks at their end).
    grad_sum, stats, aux = jax.lax.cond(
        jnp.any(chunk_and_mask[1]), chunk_clipped_sum, padding_only, *chunk_and_mask)
    carry = jax.tree.map(jnp.add, carry, (grad_sum, stats))
    return carry, aux

  (grad_sum, stats), chunk_aux = jax.lax.scan(
      accumulate, init, (chunks, chunk_masks))
  aux = jax.tree.map(
      lambda x: x.reshape((batch_size,) + x.shape[2:]), chunk_aux)
  return grad_sum, stats, aux
