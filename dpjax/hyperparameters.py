"""Checks of privacy hyperparameters that hold for every kind of number a caller may pass.

A check written ``isinstance(z, float) and not z >= 0`` lets ``np.float32('nan')``,
``jnp.array(-1.)`` and ``np.int64(0)`` through, and a NaN or negative noise multiplier then
adds no noise at all. :func:`concrete_scalar` turns Python, NumPy and concrete JAX scalars
(0-d or one-element arrays) into a Python float and checks it; booleans and traced values are
refused with a message naming the argument, since a privacy parameter must be known when the
mechanism is built.

>>> import numpy as np
>>> concrete_scalar('noise_multiplier', np.float32(1.5), minimum=0.0)
1.5
>>> concrete_scalar('noise_multiplier', np.float32('nan'), minimum=0.0)
Traceback (most recent call last):
...
ValueError: Expected noise_multiplier >= 0 and finite, got noise_multiplier=nan
"""

from __future__ import annotations

import math

import jax
import numpy as np


def concrete_scalar(name: str, value, *, minimum: float, strictly_greater: bool = False,
                    allow_inf: bool = False) -> float:
  """``value`` as a Python float, after checking it is a concrete real number in range.

  Args:
    name: the argument's name, for the message.
    value: a Python number, a NumPy scalar or array of one element, or a concrete JAX array
      of one element.
    minimum: the smallest allowed value.
    strictly_greater: require ``value > minimum`` instead of ``>=``.
    allow_inf: accept ``+inf`` (e.g. a clip norm that disables clipping).

  Raises:
    ValueError: a bool, a traced (abstract) value, a non-real or multi-element array, NaN,
      an infinity not allowed, or a value out of range.
  """
  if isinstance(value, jax.core.Tracer):
    raise ValueError(f'{name} must be a concrete number known when the mechanism is built, got '
                     f'a traced value {value}: build it outside jax.jit / vmap / grad')
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f'Expected a number for {name}, got the bool {value}')
  try:
    array = np.asarray(value)
  except (TypeError, ValueError) as error:
    raise ValueError(f'Expected a number for {name}, got {type(value).__name__}') from error
  if array.dtype == np.bool_ or not (np.issubdtype(array.dtype, np.integer)
                                     or np.issubdtype(array.dtype, np.floating)):
    raise ValueError(f'Expected a real number for {name}, got dtype {array.dtype}')
  if array.size != 1:
    raise ValueError(f'Expected one number for {name}, got an array of shape {array.shape}')
  number = float(array.reshape(()))
  relation = '>' if strictly_greater else '>='
  finite = '' if allow_inf else ' and finite'
  in_range = number > minimum if strictly_greater else number >= minimum
  if math.isnan(number) or not in_range or (math.isinf(number) and not allow_inf):
    raise ValueError(f'Expected {name} {relation} {minimum:g}{finite}, got {name}={number:g}')
  return number
