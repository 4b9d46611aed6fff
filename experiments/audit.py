"""The `--audit` option of a run: empirical attacks reported beside the accountant's epsilon.

* Membership inference (every mechanism): members are the training split, non-members the
  validation split, which comes from the same pool and is never trained on. Both attacks of
  :mod:`dpjax.audit.membership` run on the selected model's per-example losses (statistics of
  training examples: reported as not covered).
* Gradient canaries (DP-SGD): :mod:`dpjax.audit.canaries`, added inside the train step.
* Reconstruction (LDP): the attacker denoises released training images knowing beta; PSNR and
  SSIM of its best estimate against the originals, beside those of the release itself.

See docs/AUDITING.md for how to read the numbers.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from dpjax import visual_privacy
from dpjax.audit import membership

RECONSTRUCTION_IMAGES = 4


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
