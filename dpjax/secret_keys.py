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
import numpy as np

KEY_IMPL = 'threefry2x32'
_KEY_WORDS = 2  # threefry2x32 keys are two uint32 words.


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
