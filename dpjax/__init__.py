"""dpjax: differentially private training of medical image classifiers in JAX/Flax.

The parts most users import:

* :func:`dp_sgd` / :func:`gaussian_noise`: DP-SGD as optax gradient transformations.
* :func:`clipped_grad_sum` (vmap) / :func:`ghost_clipped_grad_sum` (no per-example
  gradients): the clipped sum of per-example gradients, then :func:`gaussian_noise`.
* :class:`PrivacyLedger`, :func:`calibrate_noise_multiplier`: privacy accounting.
* :mod:`dpjax.tuning`: accounted hyperparameter tuning (the best of a secret, random number of
  runs, Papernot & Steinke 2022): ``tuning.tuned_epsilon``,
  ``tuning.calibrate_per_run_noise_multiplier``, ``tuning.draw_num_runs``.
* :class:`PoissonSampler`, :class:`ShuffledSampler`: batch selection matching the accountant;
  ``sampler.batch(t)`` gives a :class:`PaddedBatch` whose ``gather`` zero-fills padding rows,
  and ``PerExampleGrads.from_batch(grads, batch)`` hands its mask to :func:`dp_sgd`.
* :func:`private_feature_stats`: per-channel feature statistics with the Gaussian mechanism.
* :func:`laplace_perturb`, :func:`brightness_shift`: local DP on images.
* :func:`fresh_secret_key`: a key from OS entropy for the noise and sampling (never a seed:
  integer keys are refused; the library separates the noise and sampling streams of a key).
"""

from dpjax.accounting import PrivacyLedger
from dpjax.accounting import calibrate_noise_multiplier
from dpjax.clipping import ClipStats
from dpjax.clipping import clip_and_sum
from dpjax.clipping import clipped_grad_sum
from dpjax.feature_stats import private_feature_stats
from dpjax.ghost_clipping import ghost_clipped_grad_sum
from dpjax.ldp import brightness_shift
from dpjax.ldp import laplace_perturb
from dpjax.ldp import ldp_epsilon_report
from dpjax.sampling import PaddedBatch
from dpjax.sampling import PoissonSampler
from dpjax.sampling import ShuffledSampler
from dpjax import noise as noise  # Re-exported: the samplers and truncation_delta.
from dpjax import secret_keys
from dpjax import tuning
from dpjax.secret_keys import fresh_secret_key
from dpjax.transforms import DpSgdState
from dpjax.transforms import GaussianNoiseState
from dpjax.transforms import PerExampleGrads
from dpjax.transforms import dp_sgd
from dpjax.transforms import gaussian_noise

__version__ = '0.1.0'

__all__ = [
    'ClipStats',
    'DpSgdState',
    'GaussianNoiseState',
    'PaddedBatch',
    'PerExampleGrads',
    'PoissonSampler',
    'PrivacyLedger',
    'ShuffledSampler',
    'brightness_shift',
    'calibrate_noise_multiplier',
    'clip_and_sum',
    'clipped_grad_sum',
    'dp_sgd',
    'fresh_secret_key',
    'gaussian_noise',
    'ghost_clipped_grad_sum',
    'private_feature_stats',
    'laplace_perturb',
    'ldp_epsilon_report',
    'secret_keys',
    'tuning',
]
