"""The `--audit` option of a run: empirical attacks reported beside the accountant's epsilon.

* Membership inference (every mechanism): members are the training split, non-members the
  test split: never trained on and never used to select anything (the validation split picks
  the released epoch, so its losses are pulled down by the selection and are not clean
  non-members). The test split is otherwise read once, for the final test metrics of the
  released model; the attack reads the same released model on it, which changes nothing
  that was chosen. Test images of patients who also have images in training (Kermany ships
  some) are left out: under the patient unit they are not non-members. Both attacks of
  :mod:`dpjax.audit.membership` run on the selected model's per-example losses (statistics of
  training examples: reported as not covered).
* Gradient canaries (DP-SGD): :mod:`dpjax.audit.canaries`, added inside the train step; as
  many guesses as the ledger's epsilon needs to be refutable (`canaries.choose_guesses`), each
  bound reported beside the most it could show and a verdict (`CANNOT TEST` when no number of
  guesses can reach the claim).
* Reconstruction (LDP): the attacker denoises released training images knowing beta; PSNR and
  SSIM of its best estimate against the originals, beside those of the release itself.

See docs/AUDITING.md for how to read the numbers.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from dpjax import visual_privacy
from dpjax.audit import canaries as canaries_lib
from dpjax.audit import membership

RECONSTRUCTION_IMAGES = 4


def membership_audit(final: dict[str, dict[str, np.ndarray]], delta: float, seed: int,
                     nonmember_mask: np.ndarray | None = None) -> dict[str, Any]:
  """Both membership attacks: members `final['train']`, non-members `final['test']` (where
  `nonmember_mask`, if given, is True). Never reads `final['val']`."""
  test = final['test']
  keep = np.ones(len(test['loss']), bool) if nonmember_mask is None else np.asarray(nonmember_mask, bool)
  attacks = membership.membership_inference(
      final['train']['loss'], np.asarray(test['loss'])[keep], final['train']['labels'],
      np.asarray(test['labels'])[keep], key=seed, delta=delta)
  nonmembers = 'test split (never trained on, never used for selection)'
  if nonmember_mask is not None:
    nonmembers += ', less its images of patients who also have images in training'
  return {'members': 'train split', 'nonmembers': nonmembers,
          'nonmembers_left_out': int((~keep).sum()),
          'delta': delta, **attacks}


def canary_audit(canaries, trained_params, delta: float, claimed_epsilon: float, *,
                 seed_public: bool) -> dict[str, Any]:
  """The one-run canary audit of the released parameters against the ledger's epsilon (the
  guesses chosen from it before scoring). With a public --noise_seed every released epsilon
  is void, so the claim is named `claimed_epsilon_if_seed_secret`, as elsewhere."""
  result = canaries_lib.canary_audit(canaries, trained_params, delta,
                                     claimed_epsilon=claimed_epsilon)
  if seed_public:
    result['claimed_epsilon_if_seed_secret'] = result.pop('claimed_epsilon')
  return result


def shared_patient_test_images(data) -> np.ndarray | None:
  """Bool per test image: its patient also has images in the training split (None: no
  patients known)."""
  if data.train.patients is None or data.test.patients is None:
    return None
  return np.isin(data.test.patients, data.train.patients)


def summary_lines(results: dict[str, Any], curator: bool) -> list[str]:
  """Console lines of a run's audits, each lower bound beside its attainable maximum; the
  membership attack (not covered) only for the curator."""
  lines = []
  canaries = results.get('release', {}).get('audit', {}).get('canaries')
  if canaries:
    line = (f'canary audit ({canaries["num_canaries"]} canaries, {canaries["num_guesses"]} '
            f'guesses, {canaries["num_correct"]} right): epsilon >= '
            f'{canaries["epsilon_lower_bound"]:.3g}')
    if 'epsilon_lower_bound_max' in canaries:  # Absent from runs of older versions.
      line += f' (at most {canaries["epsilon_lower_bound_max"]:.3g} attainable)'
    if 'verdict' in canaries:
      line += f'; {canaries["verdict"]}'
    lines.append(line)
  attacks = results.get('not_covered', {}).get('audit', {}).get('membership') if curator else None
  if attacks:
    shown = []
    for name in membership.ATTACKS:
      if name in attacks:
        a = attacks[name]
        at_most = (f' (at most {a["epsilon_lower_bound_max"]:.3g} attainable)'
                   if 'epsilon_lower_bound_max' in a else '')
        shown.append(f'{name} AUC {a["auc"]:.3f}, epsilon >= {a["epsilon_lower_bound"]:.3g}'
                     f'{at_most}')
    lines.append('membership attack, train vs held-out losses (not covered; indicative, see '
                 'docs/AUDITING.md): ' + '; '.join(shown))
  return lines


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
