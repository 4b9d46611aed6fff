"""The jitted steps of a run: `train_step(state, batch) -> (state, metrics)` and `eval_step`.

They are pure functions built once per run by `make_train_step` / `make_eval_step`, so the loop
(`experiments.train`) never recompiles between steps. DP-SGD clips each privacy unit's gradient
(ghost clipping, or the vmap reference) and adds the noise once per logical batch through
`dpjax.gaussian_noise`; the batch is split across a device mesh along its example axis.
"""

from __future__ import annotations

import math
from typing import Any
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import clipping
from dpjax import ghost_clipping
from dpjax import ldp
from dpjax import metrics as metrics_lib
from dpjax import models
from dpjax import transforms
from dpjax.audit import canaries as canaries_lib
from dpjax.data import preprocess
from experiments import feature_cache
from experiments import parallel
from experiments.config_checks import AVERAGING
from experiments.config_checks import resolve_clipping_method
from experiments.privacy_plan import PrivacyPlan

# Public randomness streams, derived from --seed (published with the results).
INIT_STREAM, AUGMENT_STREAM = 0, 3
# Private randomness streams, derived from the run's SECRET key (`dpjax.secret_keys`), never
# from --seed: whoever can regenerate them can subtract the noise or replay the sampling.
NOISE, SAMPLING, LDP, CANARY, FEATURE_STATS = range(5)


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any  # The TRAINED parameters (all of them, or the `--trainable` part).
  frozen: Any  # The parameters left at their initial (pretrained) values: never differentiated.
  average: Any  # EMA / Polyak average of `params` (post-processing of them), or None.
  batch_stats: Any
  opt_state: Any  # For DP-SGD it holds the secret noise key (`transforms.GaussianNoiseState`).
  rng: jax.Array  # PUBLIC root key of the per-step augmentation stream (from --seed).
  private_key: jax.Array  # SECRET root key of the LDP and canary streams; checkpoint only.

  def model_params(self, averaged: bool = False):
    """The full parameter tree for `model.apply`: trained (or averaged) and frozen parts."""
    trained = self.average if averaged and self.average is not None else self.params
    return models.merge_params(trained, self.frozen)


def stream_key(seed: int, stream: int) -> jax.Array:
  """A PUBLIC stream (init, augmentation) of --seed."""
  return jax.random.fold_in(jax.random.key(seed), stream)


def private_stream(private_key: jax.Array, stream: int) -> jax.Array:
  """A PRIVATE stream (NOISE, SAMPLING, LDP, CANARY, FEATURE_STATS) of the run's secret key."""
  return jax.random.fold_in(private_key, stream)


def make_optimizer(config, plan: PrivacyPlan, noise_key: jax.Array | None = None
                   ) -> optax.GradientTransformation:
  """SGD as in the paper; for DP-SGD the noise transformation comes first, on the clipped sum.

  The learning rate lives in the optimizer state (`inject_hyperparams`), so a plateau
  schedule can lower it between epochs without recompiling, and checkpoints keep it.
  """
  sgd = [optax.add_decayed_weights(config.weight_decay),
         optax.inject_hyperparams(optax.sgd)(learning_rate=config.learning_rate,
                                             momentum=config.momentum or None)]
  if plan.mech != 'dpsgd':
    return optax.chain(*sgd)
  # The noise is calibrated to one clipped unit (an example, a patient, or the paper's group of
  # examples) and the sum is divided by the expected number of such units.
  if noise_key is None:
    raise ValueError('DP-SGD needs the secret noise key (private_stream(private_key, NOISE))')
  noise = transforms.gaussian_noise(
      l2_norm_clip=config.l2_norm_clip, noise_multiplier=plan.noise_multiplier,
      key=noise_key, expected_batch_size=config.batch_size / config.clip_group_size)
  return optax.chain(noise, *sgd)


def learning_rate(opt_state) -> float:
  """The injected SGD learning rate, found by name wherever it sits in the state."""
  return float(optax.tree_utils.tree_get(opt_state, 'learning_rate'))


def set_learning_rate(opt_state, value: float):
  """A copy of the optimizer state with a new injected learning rate (no recompilation)."""
  current = optax.tree_utils.tree_get(opt_state, 'learning_rate')
  return optax.tree_utils.tree_set(opt_state, learning_rate=jnp.asarray(value, current.dtype))


def create_train_state(variables, tx, seed: int, private_key: jax.Array, *,
                       trainable: str = 'all', averaging: str = 'none') -> TrainState:
  """The state at step 0: `trainable` picks the trained parameters, the rest stay frozen."""
  params, frozen = models.split_params(variables['params'], trainable)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                    # A copy, not the same buffers: the step donates its input state.
                    average=None if averaging == 'none' else jax.tree.map(jnp.copy, params),
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                    rng=stream_key(seed, AUGMENT_STREAM), private_key=private_key)


def update_average(average, params, step, *, averaging: str, decay: float):
  """The average after the update that produced `params` (the `step`-th, counting from 1).

  'ema': decay * average + (1 - decay) * params, starting from the initial parameters.
  'polyak': the plain mean of the iterates 1..step. Either is post-processing of the released
  parameter trajectory: no privacy cost.
  """
  if averaging == 'none':
    return average
  if averaging == 'ema':
    weight = 1.0 - decay
  elif averaging == 'polyak':
    weight = 1.0 / jnp.asarray(step, jnp.float32)
  else:
    raise ValueError(f'Expected averaging in {AVERAGING}, got {averaging!r}')
  return jax.tree.map(lambda a, p: a + weight * (p - a), average, params)


def prepare_images(images_uint8, ids, *, image_size, train, augment, key, ldp_fn, ldp_key=None,
                   stable_ids=None):
  """uint8 NHWC squares -> normalised float network input (on device, inside the step).

  Augmentation is public randomness keyed per example on `stable_ids` (a hash of the file's
  path, and the view for augmentation multiplicity), never on the batch row: adding a patient
  shifts every later row of a sampled batch, and row-keyed transforms would then change other
  examples' gradients too. It runs per chunk of the batch (memory: one chunk of float images).
  """
  images = preprocess.to_unit_float(images_uint8)
  if ldp_fn is not None:
    images = ldp_fn(ldp_key, images, ids)
  if train and augment:
    images = preprocess.random_affine(key, images, image_size, example_ids=stable_ids)
  else:
    images = preprocess.center_crop(images, image_size)
  return preprocess.normalize(images)

GRAYSCALE_DATASETS = ('pneumonia',)  # X-rays: one grey value per pixel, stored as 3 equal channels.


def make_ldp_fn(config) -> Callable | None:
  """`ldp_fn(key, images, ids)`: the run's local-DP release of training images, or None.

  The key is the run's secret LDP stream, the same every epoch: one released noisy copy.
  """
  if config.mech != 'ldp':
    return None
  if config.ldp_variant == 'laplace':
    grayscale = config.dataset in GRAYSCALE_DATASETS
    return lambda key, images, ids: ldp.laplace_perturb(key, images, config.beta, ids,
                                                        grayscale=grayscale)
  perturb = ldp.PERTURBATIONS[config.ldp_variant]
  return lambda key, images, ids: perturb(key, images, config.beta, ids)


def _cross_entropy(logits, labels):
  # In float32 whatever the compute dtype: losses are summed over a batch.
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def _masked_sums(losses, correct, mask) -> dict[str, jax.Array]:
  """Loss and accuracy sums over the real (unpadded) examples of a batch.

  A real example whose loss is not finite (a NaN pixel, say) is counted apart and left out of
  the loss sum: DP-SGD gives it a zero gradient, and one such example must not stop the run
  (whether it stops would tell that the example was sampled). Divergence is judged on the
  parameters instead (`check_finite`).
  """
  finite = jnp.isfinite(losses)
  return {'loss_sum': jnp.sum(jnp.where(mask & finite, losses, 0.0)),
          'correct': jnp.sum(jnp.where(mask, correct, False)), 'count': jnp.sum(mask),
          'nonfinite_examples': jnp.sum(mask & ~finite)}


def augmentation_views(batch: dict[str, jax.Array], views: int) -> dict[str, jax.Array]:
  """Each row repeated `views` times, consecutively, with a per-view augmentation id.

  Augmentation multiplicity (De et al. 2022): an example's gradient is the MEAN over its views
  (each row's loss is divided by `views`), and its views are clipped together, so the
  sensitivity stays C. The view id folds into the public augmentation key of the example.
  """
  rows = batch['mask'].shape[0]
  if views == 1:
    return {**batch, 'aug_ids': batch['stable_ids']}
  repeated = {k: jnp.repeat(v, views, axis=0) for k, v in batch.items()}
  view = jnp.tile(jnp.arange(views, dtype=jnp.uint32), rows)
  return {**repeated, 'aug_ids': repeated['stable_ids'] * jnp.uint32(views) + view}


def make_train_step(model, tx, config, plan: PrivacyPlan, norm: str, mesh,
                    canaries=None) -> Callable:
  """Returns the jitted `train_step(state, batch) -> (state, metrics)`.

  The batch is split across `mesh` along its example axis and the state is replicated; on
  one device this is plain `jax.jit`. `canaries` (DP-SGD audit only) are added to the clipped
  sum before the noise, each sampled like an example.

  `batch` holds `images` (uint8), `labels`, `ids`, `stable_ids` and a boolean `mask` marking
  real examples; the shapes are fixed for the whole run. Images are turned into network inputs
  chunk by chunk (`--microbatch_size` rows, each example with its `--augmult` views), so a
  logical batch of thousands needs memory for its uint8 images and one chunk only: a virtual
  batch whose clipped sums accumulate and get one noise draw. Metrics are sums over real
  examples (views averaged).
  """
  ldp_fn = make_ldp_fn(config)
  cached_features = feature_cache.wanted(config)
  trains_bn = norm == 'batch_norm'
  clipping_method = resolve_clipping_method(config, norm)
  views = config.augmult

  def forward(state, params, images):
    """Training-mode logits, and the running statistics (updated only by trainable BN)."""
    variables = {'params': models.merge_params(params, state.frozen),
                 'batch_stats': state.batch_stats}
    if trains_bn:
      logits, updated = model.apply(variables, images, train=True, mutable=['batch_stats'])
      return logits, updated['batch_stats']
    return model.apply(variables, images, train=True), state.batch_stats

  def inputs(state, rows):
    if cached_features:  # Scattering features computed once (experiments.feature_cache).
      return rows['images'].astype(jnp.float32)
    key = jax.random.fold_in(state.rng, state.step)
    return prepare_images(rows['images'], rows['ids'], image_size=config.image_size,
                          train=True, augment=config.augment, key=key, ldp_fn=ldp_fn,
                          ldp_key=private_stream(state.private_key, LDP),
                          stable_ids=rows['aug_ids'])

  def row_metrics(losses, correct, mask):
    sums = _masked_sums(losses, correct, mask)
    return {k: v / views for k, v in sums.items()}  # Views of one example count once.

  def finish(state, gradient, batch_stats, metrics):
    """Applies the optimizer (and for DP-SGD, first, the noise) and updates the average."""
    updates, opt_state = tx.update(gradient, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, 'params_nonfinite': jnp.logical_not(jnp.all(jnp.array(
        [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(params)])))}
    step = state.step + 1
    average = update_average(state.average, params, step, averaging=config.averaging,
                             decay=config.ema_decay)
    return state.replace(step=step, params=params, opt_state=opt_state, average=average,
                         batch_stats=batch_stats), metrics

  def dp_step(state, batch):
    rows = augmentation_views(batch, views)
    group = plan.rows_per_unit * views
    patients = plan.privacy_unit == 'patient'
    mask = rows['mask']

    def unit_loss(params, unit):
      # One clipped unit: a single example's views, a patient's image slots and views (the
      # SUM over slots, so the patient's summed gradient is clipped; views averaged), or the
      # paper's group of examples (their mean). Trainable BN (paper protocol only) uses the
      # group's batch statistics: no DP guarantee.
      logits, new_stats = forward(state, params, inputs(state, unit))
      losses = _cross_entropy(logits, unit['labels'])
      weight = 1 / views if patients else 1 / jnp.maximum(jnp.sum(unit['mask']), 1)
      loss = jnp.sum(jnp.where(unit['mask'], losses, 0.0)) * weight
      correct = jnp.argmax(logits, -1) == unit['labels']
      return loss, {'loss': losses, 'correct': correct, 'batch_stats': new_stats}

    def row_losses(params, chunk):
      # Ghost clipping: a chunk of rows in one pass, one loss per row (a view counts 1/views).
      logits, _ = forward(state, params, inputs(state, chunk))
      losses = _cross_entropy(logits, chunk['labels'])
      return losses / views, {'loss': losses, 'correct': jnp.argmax(logits, -1) == chunk['labels']}

    if clipping_method == 'ghost':
      grad_sum, stats, aux = ghost_clipping.ghost_clipped_grad_sum(
          row_losses, state.params, rows, mask, config.l2_norm_clip,
          microbatch_size=config.microbatch_size * views or None, group_size=group)
    else:
      units = jax.tree.map(lambda x: x.reshape(-1, group, *x.shape[1:]), rows)
      grad_sum, stats, aux = clipping.clipped_grad_sum(
          unit_loss, state.params, units, jnp.any(units['mask'], axis=1), config.l2_norm_clip,
          microbatch_size=config.microbatch_size // plan.rows_per_unit or None)
    if canaries is not None:
      grad_sum = canaries_lib.add_sampled_canaries(
          grad_sum, canaries, private_stream(state.private_key, CANARY), state.step,
          plan.sampling_prob, config.l2_norm_clip)
    batch_stats = state.batch_stats
    if trains_bn:  # Mean of the groups' running-statistic updates.
      batch_stats = jax.tree.map(lambda x: jnp.mean(x, axis=0), aux['batch_stats'])
    # Statistics of private data outside the mechanism: reported as not covered.
    metrics = {**row_metrics(aux['loss'].reshape(-1), aux['correct'].reshape(-1), mask),
               'units': stats.num_examples, 'num_clipped': stats.num_clipped,
               'sum_norms': stats.sum_norms}
    return finish(state, grad_sum, batch_stats, metrics)

  def plain_step(state, batch):
    rows = augmentation_views(batch, views)
    mask = rows['mask']
    count = jnp.maximum(jnp.sum(mask), 1)
    images = inputs(state, rows)

    def batch_loss(params):
      logits, new_stats = forward(state, params, images)
      losses = _cross_entropy(logits, rows['labels'])
      loss = jnp.sum(jnp.where(mask, losses, 0.0)) / count
      return loss, (losses, logits, new_stats)

    (_, (losses, logits, new_stats)), grads = jax.value_and_grad(batch_loss, has_aux=True)(state.params)
    metrics = row_metrics(losses, jnp.argmax(logits, -1) == rows['labels'], mask)
    return finish(state, grads, new_stats, metrics)

  step = dp_step if plan.mech == 'dpsgd' else plain_step
  return jax.jit(step, donate_argnums=(0,),
                 in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                 out_shardings=parallel.replicated(mesh))


def make_eval_step(model, config, mesh) -> Callable:
  """Returns jitted `eval_step(params, batch_stats, batch) -> per-example (loss, probs)`."""

  cached_features = feature_cache.wanted(config)

  def eval_step(params, batch_stats, batch):
    if cached_features:
      images = batch['images'].astype(jnp.float32)
    else:
      images = prepare_images(batch['images'], batch['ids'], image_size=config.image_size,
                              train=False, augment=False, key=None, ldp_fn=None, ldp_key=None)
    logits = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=False)
    return _cross_entropy(logits, batch['labels']), jax.nn.softmax(logits)

  replicated = parallel.replicated(mesh)
  return jax.jit(eval_step, in_shardings=(replicated, replicated, parallel.batch_sharded(mesh)),
                 out_shardings=replicated)


def evaluate(eval_step, params, batch_stats, split, batch_size: int, mesh) -> dict[str, np.ndarray]:
  """Per-example losses and class probabilities over a whole split, in fixed-shape batches."""
  n = len(split)
  losses, probs = [], []
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    padded = np.full(batch_size, n, np.int64)  # Padding: an index past the split, zero images.
    padded[:len(idx)] = idx
    batch = load_batch(split, padded, np.arange(batch_size) < len(idx), mesh)
    loss, prob = eval_step(params, batch_stats, batch)
    losses.append(np.asarray(loss)[:len(idx)])
    probs.append(np.asarray(prob)[:len(idx)])
  return {'loss': np.concatenate(losses), 'probs': np.concatenate(probs),
          'labels': np.asarray(split.labels)}


def load_batch(split, indices: np.ndarray, mask: np.ndarray, mesh) -> dict[str, jax.Array]:
  """Gathers this process's rows of a global batch (uint8, by index) and shards it.

  Padding rows (mask False; the samplers give them an index past the split) become zero
  images with label 0, id -1 and stable id 0: no real example is read for them.
  """
  rows = parallel.local_rows(len(indices))
  local_indices = np.asarray(indices)[rows]
  local_mask = np.asarray(mask, bool)[rows]
  real = local_indices[local_mask]
  images, labels, ids = split.gather(real)
  count = len(local_indices)
  local = {'images': np.zeros((count, *images.shape[1:]), images.dtype),
           'labels': np.zeros(count, np.int32), 'ids': np.full(count, -1, np.int32),
           'stable_ids': np.zeros(count, np.uint32), 'mask': local_mask}
  local['images'][local_mask] = images
  local['labels'][local_mask] = labels
  local['ids'][local_mask] = ids
  local['stable_ids'][local_mask] = split.stable_ids[real]
  return parallel.shard_batch(local, len(indices), mesh)


def summarize(evaluation: dict[str, np.ndarray]) -> dict[str, float]:
  """Loss, accuracy and the threshold-free scores of one split (ROC AUC for two classes,
  quadratic weighted kappa otherwise), so a private model that ranks well but predicts one
  class shows it on validation too."""
  report = metrics_lib.classification_report(evaluation['probs'], evaluation['labels'])
  return {'loss': float(evaluation['loss'].mean()),
          **{k: v for k, v in report.items() if isinstance(v, float)}}


class TrainingDiverged(FloatingPointError):
  """The training loss stopped being finite: the run diverged (not bad input)."""


def check_finite(metrics: dict[str, float], step: int) -> None:
  """Stops a run whose parameters stopped being finite (not one whose batch held a NaN example)."""
  if metrics['params_nonfinite'] or not math.isfinite(metrics['loss_sum']):
    raise TrainingDiverged(f'training diverged: non-finite training loss at step {step}; '
                           'lower --learning_rate (in a new --workdir)')
