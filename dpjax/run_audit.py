"""The `--audit` option of a run: empirical attacks reported beside the accountant's epsilon.

* Membership inference (every mechanism): members are the training split, non-members the
  validation split, which comes from the same pool (a seeded stratified split) and is never
  trained on. Both attacks of :mod:`dpjax.audit.membership` run on the selected model's
  per-example losses.
* Gradient canaries (DP-SGD), the white-box one-run audit of Steinke, Nasr and Jagielski
  (NeurIPS 2023): m "Dirac" canaries, each a gradient of norm exactly C along one parameter
  coordinate, are each included in the training data with probability 1/2; an included canary
  is Poisson-sampled at rate q like every example, so the run's guarantee covers it. After
  training, the parameter change along each coordinate is its score; guessing the top and
  bottom scores gives an empirical lower bound on epsilon, which must stay below the ledger's.
* Reconstruction (LDP): the attacker denoises released training images knowing beta; PSNR and
  SSIM of its best estimate against the originals, beside those of the release itself.

See docs/AUDITING.md for how to read the numbers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from dpjax import sampling
from dpjax import visual_privacy
from dpjax.audit import membership
from dpjax.audit import one_run

RECONSTRUCTION_IMAGES = 4


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


def canary_audit(canaries: GradientCanaries, final_params, delta: float,
                 guesses_per_side: int) -> dict[str, Any]:
  flat, _ = jax.flatten_util.ravel_pytree(final_params)
  scores = np.asarray(flat)[canaries.coordinates] - canaries.initial_values
  return {'canaries': 'white-box Dirac gradient canaries (Steinke et al. 2023)',
          **one_run.audit_from_scores(scores, canaries.included, delta, guesses_per_side,
                                      guesses_per_side)}


def membership_audit(final: dict[str, dict[str, np.ndarray]], delta: float, seed: int) -> dict[str, Any]:
  attacks = membership.membership_inference(
      final['train']['loss'], final['val']['loss'], final['train']['labels'],
      final['val']['labels'], key=seed, delta=delta)
  return {'members': 'train split', 'nonmembers': 'validation split (same pool, never trained on)',
          'delta': delta, **attacks}


def reconstruction_audit(data, ldp_fn, ldp_key: jax.Array, *, grayscale: bool,
                         beta: float) -> dict[str, Any]:
  """Attacks the first few released training images (as the run released them).

  Computed from raw training images: a statistic outside the mechanism (not covered).
  """
  count = min(RECONSTRUCTION_IMAGES, len(data.train))
  images, _, ids = data.train.gather(np.arange(count))
  originals = images.astype(np.float32) / 255.0
  released = np.asarray(jax.device_get(ldp_fn(ldp_key, originals, ids.astype(np.int32))))
  runs = [visual_privacy.best_denoising_attack(r, o, beta, grayscale=grayscale)
          for r, o in zip(released, originals)]
  mean = lambda f: float(np.mean([f(r) for r in runs]))
  return {'images': count,
          'released_psnr': mean(lambda r: r['released']['psnr']),
          'released_ssim': mean(lambda r: r['released']['ssim']),
          'attack_psnr': mean(lambda r: r['best_psnr']),
          'attack_ssim': mean(lambda r: r['best_ssim']),
          'flat_baseline_psnr': mean(lambda r: r['flat_baseline']['psnr']),
          'best_attacks': sorted({r['best_attack'] for r in runs})}
