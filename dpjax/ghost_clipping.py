"""Per-example clipping without per-example gradients of the whole model (book-keeping).

:func:`ghost_clipped_grad_sum` returns what :func:`dpjax.clipping.clipped_grad_sum` returns,
the sum over examples of each example's whole-model gradient scaled to global L2 norm at most
C, but never builds the ``[batch, *params]`` tensor of per-example gradients. The signatures
match but the ``loss_fn`` differs: here ``loss_fn(params, batch)`` takes the WHOLE batch and
returns per-example losses ``[batch]``; ``clipped_grad_sum``'s takes ONE example (no batch
axis) and returns a scalar. The one-example function given here typically fails inside Flax
(``ScopeParamShapeError``: the layers see the batch where they expect one example), and a
batch function returning a mean fails with "loss_fn must return one loss per example".
One forward and one backward pass record, for every layer, its input ``x`` and the gradient
``g`` of the summed loss with respect to its output. Because examples do not interact, row b
of ``g`` is example b's own output gradient, and each layer's per-example weight gradient is a
function of ``(x_b, g_b)`` alone:

1. Per-example squared norms, layer by layer. Dense: ``|x_b|^2 |g_b|^2`` (Goodfellow 2015,
   "Efficient per-example gradient computations"). Convolution: from the patches ``P_b``
   (``[T, k*k*C]``) and ``G_b`` (``[T, O]``), either materialising the layer's gradient
   ``P_b^T G_b`` or, when ``T^2 (k*k*C + O) < T k*k*C O``, the "ghost norm"
   ``sum((P_b P_b^T) * (G_b G_b^T))`` (Li et al. 2022, "Large language models can be strong
   differentially private learners"; Bu et al. 2022, mixed ghost clipping). Other layers
   (GroupNorm, frozen BatchNorm, ...): their small per-example gradient by ``vmap``.
2. The clip factors ``min(1, C / norm_b)`` from the summed squared norms.
3. Each layer's clipped sum as that layer's weight gradient with output gradient
   ``factor_b * g_b`` (Bu et al. 2023, "Differentially private optimization on large model at
   small cost", book-keeping): one batched weight-gradient per layer, no second backward pass.

Units of several rows (``group_size=g``, e.g. one patient's images): rows ``[u g, (u+1) g)``
form unit u, whose gradient is the SUM of its rows' gradients and is clipped as a whole (the
privacy unit becomes the unit: patient-level DP when units are patients). A unit is one
example with g times the positions, so the norms are computed per unit exactly: convolution
and Dense on 2-D inputs (T = 1) reshape ``P`` and ``G`` to ``[U, g*T, .]`` (the unit's
gradient is ``sum_b P_b^T G_b``, its bias gradient the sum of G over the g*T positions) and
choose Gram or materialised by the same cost rule on g*T positions; other layers take the VJP
of the layer applied to the unit's g rows (the sum of the rows' gradients). Every row of a
unit gets the unit's clip factor in step 3. ``group_size=1`` is the per-example case above.

The cost is about one non-private step plus the norms (ResNet-18, 64 px, batch 16, 2-core
CPU: 1.9x the non-private step's time, noise included, against 10x for ``vmap``; 1.6x at
batch 64; see benchmarks/RESULTS.md).

Requirements (checked where they can be; the rest is the caller's contract):

* ``loss_fn(params, batch)`` returns per-example losses whose row b depends on row b of the
  batch only (no BatchNorm in training mode, no cross-example attention or statistics).
  ``vmap`` enforces this by construction; here it is the caller's contract, as in Opacus.
  Training-mode ``nn.BatchNorm`` is detected and refused.
* Every parameter belongs to one Flax module that owns its parameters directly (no child
  modules with parameters), is called once per forward pass through ``__call__`` with one
  array argument, and is not used outside that call. A parameter not seen in such a call, or
  seen twice, raises ``ValueError`` instead of being left unclipped.
* Layers whose parameters are not in ``params`` (frozen parts of a fine-tuned model, closed
  over by ``loss_fn``) are not differentiated and cost nothing; a layer is trained whole or
  frozen whole.

Formal guarantee: the same as :func:`dpjax.clipping.clip_and_sum`, with units for examples.
Under the requirements, the result equals the clipped sum of per-unit gradients (up to float
rounding; the tests compare with the ``vmap`` reference), so adding or removing one whole
unit changes it by at most C in L2 norm (replacing one: 2C). With ``group_size=1`` a unit is
one example; a patient with k images spread over k units can move it by k C.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any
from collections.abc import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax import clipping
from dpjax.models import conv

PyTree = Any
_EXACT = jax.lax.Precision.HIGHEST


@dataclasses.dataclass
class _LayerCall:
  """One recorded call of a parameter-owning module (trace-time bookkeeping only)."""

  name: str  # The module's path, for error messages.
  module: nn.Module  # Unbound clone, to re-apply the layer alone.
  param_names: tuple[str, ...]
  param_leaf_ids: tuple[int, ...]  # id() of the param tracers, to find them in `params`.
  kwargs: dict


def _own_params(module: nn.Module) -> tuple[dict, bool]:
  """(arrays the module owns directly, whether a child module also has parameters)."""
  params = module.variables.get('params', {})
  own = {k: v for k, v in params.items() if not isinstance(v, dict)}
  return own, len(own) != len(params)


def _record_layers(calls: list[_LayerCall], inputs: list, others: list, perturbations,
                   outputs_sink: list | None = None, trained_ids: frozenset | None = None):
  """Interceptor: records each parameter-owning layer's input, adds a perturbation to its output.

  `perturbations` is None on the shape-finding pass, which appends the outputs to
  `outputs_sink`. The list order is the call order, the same on every trace. Layers whose
  parameters are all outside `trained_ids` (frozen: not differentiated) are left alone.
  """

  in_call = []  # Modules whose __call__ is running (their own helper methods are fine).

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    name = '/'.join(module.path) or type(module).__name__
    if context.method_name != '__call__':
      outputs = next_fun(*args, **kwargs)
      if context.method_name != 'setup' and _own_params(module)[0] and not any(
          m is module for m in in_call):
        # e.g. tied weights through nn.Embed.attend: that use would escape the norms.
        raise ValueError(f'ghost clipping: parameters of module {name} are used by its method'
                         f' {context.method_name}; only __call__ is supported, use'
                         ' clipping_method=vmap')
      return outputs
    if isinstance(module, nn.BatchNorm) and not module.use_running_average:
      if not kwargs.get('use_running_average', False):
        raise ValueError(f'ghost clipping: BatchNorm {name} uses batch statistics, which mixes'
                         ' examples; per-example clipping is undefined')
    in_call.append(module)
    try:
      outputs = next_fun(*args, **kwargs)
    finally:
      in_call.pop()
    own, has_param_children = _own_params(module)
    if own and trained_ids is not None:
      trained = [k for k, v in own.items() if id(v) in trained_ids]
      if not trained:
        return outputs  # A frozen layer: no gradient, no noise, nothing to clip.
      if len(trained) != len(own):
        raise ValueError(f'ghost clipping: module {name} mixes trained and frozen parameters;'
                         ' train all of a layer or none of it')
    if not own:
      return outputs
    if has_param_children:
      raise ValueError(
          f'ghost clipping: module {name} has parameters of its own and child modules with'
          ' parameters; use clipping_method=vmap')
    array_kwargs = [k for k, v in kwargs.items() if isinstance(v, jax.Array)]
    if len(args) != 1 or array_kwargs or not isinstance(outputs, jax.Array):
      raise ValueError(f'ghost clipping: module {name} must take one array and return one'
                       ' array; use clipping_method=vmap')
    if args[0].shape[:1] != outputs.shape[:1]:
      raise ValueError(f'ghost clipping: module {name} must keep the example axis first,'
                       f' got input {args[0].shape} and output {outputs.shape}')
    names = tuple(sorted(own))
    calls.append(_LayerCall(name, module.clone(parent=None), names,
                            tuple(id(own[k]) for k in names), dict(kwargs)))
    inputs.append(args[0])
    others.append({c: v for c, v in module.variables.items() if c != 'params'})
    if perturbations is None:
      outputs_sink.append(outputs)
      return outputs
    return outputs + perturbations[len(calls) - 1]

  return interceptor


def _wider(dtype):
  """float32 for floating types narrower than it (bfloat16, float16), else unchanged."""
  if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
    return jnp.float32
  return dtype


def _in_float32(call: _LayerCall) -> _LayerCall:
  """The call with its module computing in float32 when the model computes in less."""
  dtype = getattr(call.module, 'dtype', None)
  if dtype is None or _wider(jnp.dtype(dtype)) == jnp.dtype(dtype):
    return call
  return dataclasses.replace(call, module=call.module.clone(dtype=jnp.float32))


def _layer_output(call: _LayerCall, layer_params: dict, other_vars: dict, x):
  return call.module.apply({'params': layer_params, **other_vars}, x, **call.kwargs)


def _conv_squared_norms(module: nn.Conv, x, g, group_size: int = 1) -> jax.Array | None:
  """Per-unit squared norms of a plain convolution's kernel (+ bias) gradient, or None."""
  kernel = module.kernel_size
  kernel = (kernel,) if isinstance(kernel, int) else tuple(kernel)  # flax: int = 1-D.
  if (module.feature_group_count != 1 or not module.shared_weights or module.mask is not None
      or x.ndim != 4 or len(kernel) != 2 or module.input_dilation not in (1, None, (1, 1))
      or module.kernel_dilation not in (1, None, (1, 1))
      or not isinstance(module.padding, (str, tuple, list))
      or (isinstance(module.padding, str) and module.padding not in ('SAME', 'VALID'))):
    return None
  strides = module.strides or 1
  strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
  padding = module.padding
  if not isinstance(padding, str):
    padding = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
  patches = conv.extract_patches(x, kernel, strides, padding)
  return _unit_squared_norms(patches.reshape(x.shape[0], -1, patches.shape[-1]),
                             g.reshape(g.shape[0], -1, g.shape[-1]), module.use_bias, group_size)


def _unit_squared_norms(patches, out_grads, use_bias: bool, group_size: int) -> jax.Array:
  """Squared norms of ``sum_b P_b^T G_b`` (+ bias ``sum_b,t G_b``) per unit of rows, ``[U]``.

  `patches` ``[B, T, F]`` and `out_grads` ``[B, T, O]``; a unit of ``group_size`` consecutive
  rows is one example with ``group_size * T`` positions.
  """
  units = patches.shape[0] // group_size
  patches = patches.reshape(units, -1, patches.shape[-1])
  out_grads = out_grads.reshape(units, -1, out_grads.shape[-1])
  positions, fan_in, fan_out = patches.shape[1], patches.shape[2], out_grads.shape[2]
  if positions * positions * (fan_in + fan_out) < positions * fan_in * fan_out:
    # Ghost norm: |P^T G|_F^2 = <P P^T, G G^T>, cheap when there are few positions.
    # Full float32 (no TF32 on GPUs): the Gram products cancel, a sum of squares does not.
    squared = jnp.sum(jnp.einsum('bti,bsi->bts', patches, patches, precision=_EXACT)
                      * jnp.einsum('bto,bso->bts', out_grads, out_grads, precision=_EXACT),
                      axis=(1, 2))
    squared = jnp.maximum(squared, 0.0)
  else:
    per_unit = jnp.einsum('bti,bto->bio', patches, out_grads, precision=_EXACT)
    squared = jnp.sum(jnp.square(per_unit), axis=(1, 2))
  if use_bias:
    squared = squared + jnp.sum(jnp.square(jnp.sum(out_grads, axis=1)), axis=1)
  return squared


def _dense_squared_norms(module: nn.Dense, x, g, group_size: int = 1) -> jax.Array | None:
  if x.ndim != 2:
    return None
  if group_size > 1:  # A unit is one example with `group_size` positions.
    return _unit_squared_norms(x[:, None], g[:, None], module.use_bias, group_size)
  squared = jnp.sum(jnp.square(x), axis=1) * jnp.sum(jnp.square(g), axis=1)
  if module.use_bias:
    squared = squared + jnp.sum(jnp.square(g), axis=1)
  return squared


def _layer_squared_norms(call: _LayerCall, layer_params: dict, other_vars: dict, x, g,
                         group_size: int = 1):
  """Per-unit squared L2 norms of one layer's parameter gradients, ``[batch // group_size]``.

  A unit's gradient is the sum of its ``group_size`` consecutive rows' gradients.
  """
  squared = None
  if type(call.module) is nn.Conv:  # pylint: disable=unidiomatic-typecheck
    squared = _conv_squared_norms(call.module, x, g, group_size)
  elif type(call.module) is nn.Dense:  # pylint: disable=unidiomatic-typecheck
    squared = _dense_squared_norms(call.module, x, g, group_size)
  if squared is not None:
    return squared

  if group_size > 1:
    # The layer applied to a unit's rows as a batch of `group_size`: with rows independent
    # (the module's requirement), its weight gradient is the sum of the rows' gradients.
    def one_unit(x_unit, g_unit):
      _, vjp = jax.vjp(lambda p: _layer_output(call, p, other_vars, x_unit), layer_params)
      (grads,) = vjp(g_unit)
      return sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(grads))

    to_units = lambda v: v.reshape((-1, group_size) + v.shape[1:])
    return jax.vmap(one_unit)(to_units(x), to_units(g))

  def one_example(x_row, g_row):
    _, vjp = jax.vjp(lambda p: _layer_output(call, p, other_vars, x_row[None]), layer_params)
    (grads,) = vjp(g_row[None])
    return sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(grads))

  return jax.vmap(one_example)(x, g)


def _check_coverage(calls: list[_LayerCall], params: PyTree) -> list[list[int]]:
  """Maps each call's parameters to leaf positions of `params`; every leaf exactly once."""
  index = {id(leaf): i for i, leaf in enumerate(jax.tree.leaves(params))}
  leaves_per_call, seen = [], set()
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for call in calls:
    positions = []
    for leaf_id, param_name in zip(call.param_leaf_ids, call.param_names):
      if leaf_id not in index:
        raise ValueError(f'ghost clipping: parameter {param_name} of module {call.name} is not a'
                         ' leaf of `params` (a constant or a transformed copy?)')
      position = index[leaf_id]
      if position in seen:
        raise ValueError(f'ghost clipping: parameter {paths[position]} is used by two layer'
                         ' calls (shared weights); use clipping_method=vmap')
      seen.add(position)
      positions.append(position)
    leaves_per_call.append(positions)
  missing = [paths[i] for i in range(len(paths)) if i not in seen]
  if missing:
    raise ValueError(f'ghost clipping: parameters used outside a supported layer call:'
                     f' {missing[:5]}; use clipping_method=vmap')
  return leaves_per_call


def _zeros_like_shapes(shapes):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def ghost_clipped_grad_sum(
    loss_fn: Callable[[PyTree, PyTree], tuple[jax.Array, PyTree]],
    params: PyTree,
    batch: PyTree,
    mask: jax.Array | None,
    l2_norm_clip: float | jax.Array,
    microbatch_size: int | None = None,
    *,
    group_size: int = 1,
) -> tuple[PyTree, clipping.ClipStats, PyTree]:
  """Clipped sum of per-example (or per-unit) gradients of a Flax model's loss, without vmap.

  Args:
    loss_fn: ``loss_fn(params, batch) -> (losses, aux)`` for the WHOLE batch (a chunk of
      ``microbatch_size`` rows when set): ``batch`` keeps its example axis, ``losses`` has
      shape ``[batch]`` (one loss per example, NOT their mean), ``aux`` is a pytree of
      ``[batch, ...]`` arrays. This is not the ``loss_fn`` of
      :func:`dpjax.clipping.clipped_grad_sum`, which takes ONE example without the batch
      axis (given here, it typically raises Flax's ``ScopeParamShapeError``). It must apply
      Flax modules (see the module docstring for the requirements). For example::

        def loss_fn(params, batch):  # x: [B, H, W, C], y: [B]
          x, y = batch
          logits = model.apply(params, x)
          return optax.softmax_cross_entropy_with_integer_labels(logits, y), logits  # [B]
    params: the parameters to differentiate with respect to.
    batch: pytree of arrays with the example axis first.
    mask: bool ``[batch]`` marking real rows (None: all real), per row also when
      ``group_size > 1``. Padding rows contribute exactly zero, even when non-finite; so does
      a real unit whose gradient is not finite (counted in ``stats.num_nonfinite``).
    l2_norm_clip: the clip norm C.
    microbatch_size: if set, process this many rows at a time in a ``lax.scan``; a multiple
      of ``group_size`` (a chunk never splits a unit).
    group_size: rows ``[u * g, (u + 1) * g)`` (``g = group_size``) form clipped unit u, e.g.
      the image slots of one patient. The unit's gradient is the sum of its real rows' loss
      gradients; it is clipped as a whole, and a unit is real iff one of its rows is. The
      batch size must be a multiple of ``group_size``. 1 (default): every row is a unit.

  Returns:
    ``(grad_sum, stats, aux)`` as :func:`dpjax.clipping.clipped_grad_sum`, with units for
    examples: ``stats`` counts real units (``num_examples``), clipped units, and sums the
    real units' norms; ``aux`` stays per row, ``[batch, ...]``.

  Raises:
    ValueError: a batch size or ``microbatch_size`` that is not a multiple of
      ``group_size``, or a model outside the module's requirements.

  Row b of ``losses`` must depend on row b of ``batch`` only (no BatchNorm in training mode,
  no statistics across the batch): unlike vmap, nothing here can enforce that.

  Formal guarantees:
    Same as :func:`dpjax.clipping.clip_and_sum` under the module's requirements, with units
    for examples: adding or removing one whole unit (all of its rows, or flipping the mask of
    all of them) moves ``grad_sum`` by at most C in L2 norm (replacing one: 2C). A caller
    whose units are all of one patient's images (each patient in at most one unit) gets
    patient-level DP. With ``group_size=1`` a patient with k images moves it by up to k C.
  """
  l2_norm_clip = clipping.checked_clip_norm(l2_norm_clip)
  try:
    units_ok = operator.index(group_size) >= 1  # A Python or NumPy integer (static).
  except TypeError:
    units_ok = False
  if not units_ok or isinstance(group_size, bool):
    raise ValueError(f'ghost clipping: expected an integer {group_size=} >= 1')
  group_size = operator.index(group_size)
  if group_size > 1:
    batch_sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None
                   for leaf in jax.tree.leaves(batch)}
    if len(batch_sizes) == 1 and None not in batch_sizes:  # Else accumulate_chunks says why.
      (batch_size,) = batch_sizes
      if batch_size % group_size:
        raise ValueError(f'ghost clipping: the batch size {batch_size} must be a multiple of'
                         f' {group_size=} (each unit is group_size consecutive rows)')
    if microbatch_size is not None and microbatch_size % group_size:
      raise ValueError(f'ghost clipping: {microbatch_size=} must be a multiple of'
                       f' {group_size=}, so that no chunk splits a unit')

  def chunk_clipped_sum(chunk, chunk_mask):
    return _clipped_sum_one_pass(loss_fn, params, chunk, chunk_mask, l2_norm_clip, group_size)

  return clipping.accumulate_chunks(chunk_clipped_sum, batch, mask, microbatch_size)


_LOSS_FN_CONTRACT = ("ghost_clipped_grad_sum's loss_fn takes the whole batch and returns "
                     "per-example losses [batch]; clipped_grad_sum's takes one example")


def _clipped_sum_one_pass(loss_fn, params, batch, is_real, l2_norm_clip, group_size=1):
  # Pass 1 (shapes only): which layers run, and the shapes of their outputs.
  trained_ids = frozenset(id(leaf) for leaf in jax.tree.leaves(params))

  def layer_outputs():
    calls, inputs, others, outputs = [], [], [], []
    with nn.intercept_methods(_record_layers(calls, inputs, others, None, outputs, trained_ids)):
      loss_fn(params, batch)
    return outputs

  try:
    output_shapes = jax.eval_shape(layer_outputs)
  except flax.errors.ScopeParamShapeError as e:
    # The usual cause: clipped_grad_sum's one-example loss_fn handed a whole batch.
    raise ValueError(f'{_LOSS_FN_CONTRACT} (flax: {e})') from None

  # Pass 2: forward and backward with respect to zero perturbations of the layer outputs,
  # whose gradients are the output gradients g (weight gradients are not formed here).
  calls: list[_LayerCall] = []

  def summed_loss(perturbations):
    calls.clear()
    inputs, others = [], []
    with nn.intercept_methods(_record_layers(calls, inputs, others, perturbations,
                                             trained_ids=trained_ids)):
      losses, aux = loss_fn(params, batch)
    if jnp.shape(losses) != jnp.shape(is_real):
      raise ValueError(f'ghost clipping: loss_fn must return one loss per example, shape'
                       f' {jnp.shape(is_real)}, got {jnp.shape(losses)}; {_LOSS_FN_CONTRACT}')
    # where, not *: a padded row with a non-finite loss must give exactly zero gradient.
    return jnp.sum(jnp.where(is_real, losses, 0.0)), (inputs, others, aux)

  output_grads, (inputs, others, aux) = jax.grad(summed_loss, has_aux=True)(
      _zeros_like_shapes(output_shapes))
  if [(x.shape, x.dtype) for x in output_grads] != [(s.shape, s.dtype) for s in output_shapes]:
    raise ValueError('ghost clipping: loss_fn called its layers differently on two traces')
  leaves_per_call = _check_coverage(calls, params)

  param_leaves, treedef = jax.tree.flatten(params)
  row = lambda v, ndim: v.reshape((-1,) + (1,) * (ndim - 1))
  layers = []
  for call, positions, x, other_vars, g in zip(calls, leaves_per_call, inputs, others,
                                               output_grads):
    # Padding rows: zero inputs and output gradients. Their loss gradient is 0, but a
    # non-finite padded row turns it into 0 * NaN on the way back; `where` keeps it out.
    x = jnp.where(row(is_real, x.ndim), x, jnp.zeros((), x.dtype))
    g = jnp.where(row(is_real, g.ndim), g, jnp.zeros((), g.dtype))
    # Low-precision models (bfloat16 activations): the norms and the clipped sum are computed
    # in float32 from the same x and g, so each example's contribution is the vector whose
    # norm was measured (norm <= C up to float32 rounding, as in a float32 model).
    call, x, g = _in_float32(call), x.astype(_wider(x.dtype)), g.astype(_wider(g.dtype))
    layer_params = dict(zip(call.param_names, (param_leaves[i] for i in positions)))
    layers.append((call, positions, layer_params, other_vars, x, g))

  # A unit with a non-finite input or output gradient in any layer (a NaN or infinite example)
  # contributes exactly zero and is counted: its rows are zeroed before the norms and the
  # batched VJP (a NaN row times a zero factor would still be NaN there).
  row_finite = jnp.ones(is_real.shape, bool)
  for _, _, _, _, x, g in layers:
    for value in (x, g):
      row_finite &= jnp.all(jnp.isfinite(value.reshape(value.shape[0], -1)), axis=1)
  unit_finite = jnp.all(row_finite.reshape(-1, group_size), axis=1)
  rows_kept = jnp.repeat(unit_finite, group_size)
  layers = [(call, positions, layer_params, other_vars,
             jnp.where(row(rows_kept, x.ndim), x, jnp.zeros((), x.dtype)),
             jnp.where(row(rows_kept, g.ndim), g, jnp.zeros((), g.dtype)))
            for call, positions, layer_params, other_vars, x, g in layers]

  squared = sum(_layer_squared_norms(call, layer_params, other_vars, x, g, group_size)
                for call, _, layer_params, other_vars, x, g in layers)
  # One per unit (per row when group_size == 1); NaN marks a non-finite unit for the stats.
  norms = jnp.where(unit_finite, jnp.sqrt(squared), jnp.nan)
  unit_is_real = is_real if group_size == 1 else jnp.any(is_real.reshape(-1, group_size), axis=1)
  # min(1, C / norm) for real units with a finite norm (float32 overflow included); 0 otherwise.
  unit_factors = clipping.clip_factors(norms, unit_is_real, l2_norm_clip)
  # Each row gets its unit's factor: the unit's rows' gradients are scaled together.
  factors = jnp.where(is_real, jnp.repeat(unit_factors, group_size), 0.0)

  # Book-keeping: each layer's clipped sum is its weight gradient for output gradients
  # factor_b * g_b (factor_b: the factor of row b's unit), one batched VJP of that layer alone.
  # At full precision, like the norms: at the default precision accelerators multiply in TF32
  # or one bf16 pass, and the vector summed would not be the one whose norm was clipped to C.
  summed = [None] * len(param_leaves)
  with jax.default_matmul_precision('highest'):
    for call, positions, layer_params, other_vars, x, g in layers:
      apply = lambda p, call=call, other_vars=other_vars, x=x: _layer_output(call, p, other_vars, x)
      _, vjp = jax.vjp(apply, layer_params)
      (layer_grads,) = vjp((g * row(factors, g.ndim)).astype(g.dtype))
      for name, position in zip(call.param_names, positions):
        summed[position] = layer_grads[name]
  grad_sum = jax.tree.unflatten(treedef, summed)
  return grad_sum, clipping.ClipStats.of_norms(norms, unit_is_real, l2_norm_clip), aux
