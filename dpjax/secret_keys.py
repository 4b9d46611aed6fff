"""Secret keys for the randomness a DP guarantee rests on.

DP-SGD's noise and Poisson sampling, LDP's noise and an audit's canaries are *private*
randomness: the guarantee assumes the adversary cannot predict them. Whoever can regenerate
them (from a published seed, say) can subtract the noise and replay the sampling, and against
that adversary epsilon is infinite; two runs that share such keys also leak in combination
(from LDP releases at beta and 2*beta of the same noise, ``2 * y1 - y2`` is the raw pixel).

* :func:`fresh_secret_key` draws a key from the operating system's entropy (``os.urandom``):
  the default for every new run. Keep it only where the run's other private artifacts are
  (its checkpoint, needed for an exact resume), never in results or logs.
* :func:`reproducible_secret_key` derives a key from an explicit ``noise_seed`` and the run's
  identity, for tests and debugging. There is NO guarantee against anyone who knows the seed;
  mixing in the run's identity keeps two different runs with the same seed from sharing noise.

The keys are JAX ``threefry2x32`` keys: 64 bits of key. Threefry is a counter-based generator
built from the Threefish block cipher, but JAX does not claim it is a cryptographically secure
generator, and its Gaussian and Laplace samples are float32 transforms of uniform bits: these
are not defended against (see the README's "What the guarantees cover").

Domain separation. The library never uses a caller's key directly: DP-SGD's noise
(:func:`dpjax.dp_sgd`, :func:`dpjax.gaussian_noise`) draws from :func:`noise_stream_key`
``(key) = fold_in(key, NOISE_DOMAIN_TAG)`` and the samplers from :func:`sampling_stream_key`
``(key) = fold_in(key, SAMPLING_DOMAIN_TAG)``. The same key passed to both therefore gives
two unrelated streams. Without it the noise of the first parameter leaf at step t was drawn
from ``split(fold_in(key, t), n)[0]``, which under JAX's partitionable threefry equals
``fold_in(fold_in(key, t), 0)``: exactly the key of the sampler's inclusion bits at step t,
so that leaf's noise was a monotone function of which examples were sampled (correlation
-0.8 at q = 0.5). Separation does not make one key safe for two *runs*: two runs with one key
add the same noise, which cancels in their difference. Every run needs its own secret key.

Integer seeds are refused where the privacy of a release rests on the key
(:func:`as_secret_key`): ``key=0`` is a published key. Tests pass a typed
``jax.random.key(0)`` (saying it is not secret) or, for :func:`dpjax.dp_sgd` and
:func:`dpjax.gaussian_noise`, ``allow_int_key_for_testing=True``.

>>> import jax
>>> a, b = fresh_secret_key(), fresh_secret_key()
>>> bool((jax.random.key_data(a) != jax.random.key_data(b)).any())
True
>>> c = reproducible_secret_key(7, 'pneumonia dpsgd beta=1')
>>> bool((jax.random.key_data(c) == jax.random.key_data(
...     reproducible_secret_key(7, 'pneumonia dpsgd beta=1'))).all())
True
"""

from __future__ import annotations

import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np

KEY_IMPL = 'threefry2x32'
_KEY_WORDS = 2  # threefry2x32 keys are two uint32 words.

# Fixed 32-bit tags folded into a caller's key before any other use (ASCII 'nois' and 'samp').
# Distinct and far from the small integers callers fold in for their own streams.
NOISE_DOMAIN_TAG = 0x6E6F6973
SAMPLING_DOMAIN_TAG = 0x73616D70


def key_from_data(words) -> jax.Array:
  """A typed key from its raw uint32 words (as :func:`key_to_data` returns them)."""
  data = np.asarray(words, np.uint32)
  if data.shape != (_KEY_WORDS,):
    raise ValueError(f'Expected {_KEY_WORDS} uint32 key words, got shape {data.shape}')
  return jax.random.wrap_key_data(data, impl=KEY_IMPL)


def key_to_data(key: jax.Array) -> list[int]:
  """The raw words of a typed key, as plain ints (for a private checkpoint, never results)."""
  return [int(w) for w in np.asarray(jax.random.key_data(key)).reshape(-1)]


def fresh_secret_key() -> jax.Array:
  """A key from 64 bits of operating-system entropy: unpredictable, different every call."""
  return key_from_data(np.frombuffer(os.urandom(4 * _KEY_WORDS), np.uint32))


def reproducible_secret_key(noise_seed: int, run_identity: str) -> jax.Array:
  """A key determined by ``noise_seed`` and ``run_identity`` (a description of the run).

  For reproducible tests and debugging only: the guarantee is void against whoever knows
  ``noise_seed``. The identity is hashed in so that two different runs (say LDP at beta 1
  and 2) with the same seed get unrelated keys.
  """
  if int(noise_seed) < 0:
    raise ValueError(f'Expected {noise_seed=} >= 0')
  digest = hashlib.sha256(f'dpjax-noise-seed|{int(noise_seed)}|{run_identity}'.encode()).digest()
  return key_from_data(np.frombuffer(digest[:4 * _KEY_WORDS], np.uint32))


def as_secret_key(key, *, what: str = 'key', allow_int_key_for_testing: bool = False
                  ) -> jax.Array:
  """A typed PRNG key from a typed key or raw uint32 key data; integer seeds are refused.

  An integer (Python, NumPy, or a 0-d integer array) is a seed, not a secret: whoever reads
  the code or the config regenerates the noise or the batches, and two runs with the same seed
  share them (their noise cancels in a difference). With ``allow_int_key_for_testing=True``
  it becomes ``jax.random.key(seed)``, for tests only. Bools, floats and traced raw values are
  always refused. ``what`` names the argument in the error messages.
  """
  if isinstance(key, (bool, np.bool_)) or (hasattr(key, 'dtype') and key.dtype == np.bool_):
    raise ValueError(f'Expected a secret JAX PRNG key for {what}, got the bool {key!r}')
  is_typed = hasattr(key, 'dtype') and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  if isinstance(key, jax.core.Tracer) and not is_typed:
    raise ValueError(f'Expected a typed JAX PRNG key (jax.random.key) for {what}, got a traced '
                     'raw value')
  if is_typed:
    return key
  if isinstance(key, (int, np.integer)) or (
      hasattr(key, 'dtype') and jnp.issubdtype(key.dtype, jnp.integer) and np.ndim(key) == 0):
    if not allow_int_key_for_testing:
      raise ValueError(
          f'{what}={key!r} is an integer seed, not a secret key: anyone who knows it can '
          'regenerate the noise (or the batches) and the guarantee is void against them. Pass '
          'dpjax.fresh_secret_key() (OS entropy); a test may pass jax.random.key(seed) or '
          'allow_int_key_for_testing=True')
    return jax.random.key(int(key))
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if key.dtype != jnp.uint32:
    raise ValueError(f'Expected a JAX PRNG key for {what} (typed, or raw uint32 key data), got '
                     f'dtype {key.dtype} of shape {key.shape}')
  if not allow_int_key_for_testing and _is_legacy_small_seed(key):
    # jax.random.PRNGKey(s) is the seed s in disguise (threefry key data [0, s]); a key from
    # OS entropy looks like this with probability 2**-48.
    raise ValueError(
        f'{what}=jax.random.PRNGKey({int(np.asarray(key)[1])}) is a seed, not a secret key: '
        'anyone who knows it can regenerate the noise (or the batches). Pass '
        'dpjax.fresh_secret_key() (OS entropy); a test may pass jax.random.key(seed) or '
        'allow_int_key_for_testing=True')
  return jax.random.wrap_key_data(key)


_SMALL_SEED = 2**16


def _is_legacy_small_seed(key_data: jax.Array) -> bool:
  """Whether raw threefry key data is `jax.random.PRNGKey(s)` for a small seed s."""
  if isinstance(key_data, jax.core.Tracer) or key_data.shape != (2,):
    return False
  words = np.asarray(key_data)
  return int(words[0]) == 0 and int(words[1]) < _SMALL_SEED


def noise_stream_key(key: jax.Array) -> jax.Array:
  """The root of DP-SGD's noise stream: ``fold_in(key, NOISE_DOMAIN_TAG)``."""
  return jax.random.fold_in(key, NOISE_DOMAIN_TAG)


def sampling_stream_key(key: jax.Array) -> jax.Array:
  """The root of a sampler's stream: ``fold_in(key, SAMPLING_DOMAIN_TAG)``."""
  return jax.random.fold_in(key, SAMPLING_DOMAIN_TAG)
