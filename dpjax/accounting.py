"""Privacy accounting: a ledger of the DP-SGD steps actually taken.

:class:`PrivacyLedger` stores the steps run-length encoded, as
``(noise_multiplier, sampling_prob, count)`` runs, turns them into one
dp-accounting ``DpEvent`` and asks a PLD or RDP accountant for epsilon.
Record a step only after it has been taken, save ``to_dict()`` with every
checkpoint and restore with ``from_dict()``: a resumed run then never
under-counts.

Two samplers, two events (see :mod:`dpjax.sampling`):

* ``'poisson'``: every step is ``PoissonSampledDpEvent(q,
  GaussianDpEvent(z))``; adjacency add/remove one example.
* ``'shuffled'`` (fixed-size batches of a per-epoch permutation): dp-accounting
  has no tight event for shuffling, so no amplification is claimed. Each
  example is in at most one batch per epoch, so under replace-one adjacency
  (the sum moves by at most 2C) an epoch is, by parallel composition over its
  disjoint batches, one Gaussian mechanism with sensitivity 2C and noise
  z * C: ``GaussianDpEvent(z / 2)``. Epochs compose; a partial epoch counts
  as a full one; an epoch whose steps used different z counts with its
  smallest z. The 2C is folded into z / 2, so this event is fed to the
  accountants with their add/remove relation, where a ``GaussianDpEvent``
  means a plain shift by one noise unit. (dp-accounting's PLD accountant
  built with ``REPLACE_ONE`` would double the shift once more, while its RDP
  accountant would not; folding the factor in ourselves avoids both.)

>>> ledger = PrivacyLedger('poisson')
>>> ledger.record_steps(noise_multiplier=5.002, sampling_prob=128 / 5218,
...                     count=2038)
>>> round(ledger.epsilon(delta=1e-4, accountant='pld'), 2)
0.69
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, NamedTuple

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
import numpy as np
from scipy import optimize

SAMPLINGS = ('poisson', 'shuffled')
ACCOUNTANTS = ('pld', 'rdp')

# PLD grid step for the privacy loss, relative to max(1, epsilon): 1e-4 (the
# dp-accounting default) for epsilon <= 1, e.g. the paper settings (about
# 0.1 s each, matching FACTS.md to 1e-3); coarser for large epsilon, where a
# fixed 1e-4 grid takes seconds. A first pass on a 1e-3 grid estimates
# epsilon. PLD rounds pessimistically, so every grid gives an upper bound.
PLD_RELATIVE_DISCRETIZATION = 1e-4
_PLD_COARSE_DISCRETIZATION = 1e-3
# RDP orders: dense near 1 (small epsilon), integers up to 63, a few large.
RDP_ORDERS = tuple(rdp_privacy_accountant.DEFAULT_RDP_ORDERS)

_FORMAT_VERSION = 1

# Calibration never answers below this noise multiplier: a target that needs less noise is
# "essentially no privacy" (even one Gaussian step at z = 0.3 is epsilon ~ 18 at delta 1e-5),
# and the accountants get slow as z shrinks. Raised as EssentiallyNoPrivacy, at once.
MIN_NOISE_MULTIPLIER = 0.3


class EssentiallyNoPrivacy(ValueError):
  """The target epsilon is reached with less noise than MIN_NOISE_MULTIPLIER."""


class StepRun(NamedTuple):
  """``count`` consecutive steps with the same noise and sampling rate."""

  noise_multiplier: float
  sampling_prob: float
  count: int


def make_accountant(
    accountant: str = 'pld',
    pld_value_discretization_interval: float = PLD_RELATIVE_DISCRETIZATION,
) -> dp_accounting.PrivacyAccountant:
  """A fresh PLD or RDP accountant with add/remove-one relation."""
  relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
  if accountant == 'pld':
    return pld_privacy_accountant.PLDAccountant(
        neighboring_relation=relation,
        value_discretization_interval=pld_value_discretization_interval)
  if accountant == 'rdp':
    return rdp_privacy_accountant.RdpAccountant(
        orders=RDP_ORDERS, neighboring_relation=relation)
  raise ValueError(f'Expected accountant in {ACCOUNTANTS}, got {accountant!r}')


@contextlib.contextmanager
def _quiet_rdp_orders():
  """dp-accounting logs a warning per RDP order it drops (small z, large q); the bound stays
  valid without them, so they are noise on the console."""
  logger = logging.getLogger('absl')
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def event_epsilon(event: dp_accounting.DpEvent, delta: float,
                  accountant: str = 'pld') -> float:
  """Epsilon of ``event`` at ``delta``; PLD on a grid scaled to epsilon."""
  if accountant != 'pld':
    with _quiet_rdp_orders():
      return float(make_accountant(accountant).compose(event).get_epsilon(delta))
  coarse = make_accountant('pld', _PLD_COARSE_DISCRETIZATION).compose(
      event).get_epsilon(delta)
  interval = PLD_RELATIVE_DISCRETIZATION * max(1.0, coarse)
  if not math.isfinite(coarse) or interval >= _PLD_COARSE_DISCRETIZATION:
    return float(coarse)
  return float(make_accountant('pld', interval).compose(
      event).get_epsilon(delta))


def _compose(events: list[dp_accounting.DpEvent]) -> dp_accounting.DpEvent:
  if not events:
    return dp_accounting.NoOpDpEvent()
  if len(events) == 1:
    return events[0]
  return dp_accounting.ComposedDpEvent(events)


def _default_steps_per_epoch(runs: list[StepRun]) -> int:
  # floor(1/q) <= the true steps per epoch of any fixed-size sampler with
  # batch size q*N (drop_last or not), so epochs are never under-counted.
  largest_prob = max(run.sampling_prob for run in runs)
  return max(1, math.floor(1 / largest_prob + 1e-9))


class PrivacyLedger:
  """Record of the DP-SGD steps taken, and their privacy cost.

  Args:
    sampling: ``'poisson'`` (each step is the Poisson-sampled Gaussian
      mechanism, add/remove-one adjacency) or ``'shuffled'`` (fixed-size
      shuffled batches, replace-one adjacency, one Gaussian mechanism of
      sensitivity 2C per epoch; see the module docstring).
    steps_per_epoch: only for ``'shuffled'``: the sampler's steps per epoch
      (``ShuffledSampler.steps_per_epoch``), steps counted from 0 at an epoch
      start. If None, ``floor(1 / max sampling_prob)`` is used with the
      smallest recorded z for every epoch, which never under-counts but is
      looser when z changes.

  Formal guarantees:
    ``epsilon(delta)`` bounds the (epsilon, delta)-DP of the recorded steps
    under ``neighbouring_relation``, provided each recorded step added
    N(0, (zC)^2) to a sum of per-example gradients clipped to norm C, with
    batches drawn as ``sampling`` says, independently of the noise.
  """

  def __init__(self, sampling: str = 'poisson',
               steps_per_epoch: int | None = None):
    if sampling not in SAMPLINGS:
      raise ValueError(f'Expected sampling in {SAMPLINGS}, got {sampling!r}')
    if steps_per_epoch is not None:
      if sampling != 'shuffled':
        raise ValueError('steps_per_epoch only applies to sampling="shuffled"')
      if steps_per_epoch < 1:
        raise ValueError(f'Expected {steps_per_epoch=} >= 1')
      steps_per_epoch = int(steps_per_epoch)
    self.sampling = sampling
    self.steps_per_epoch = steps_per_epoch
    self._runs: list[StepRun] = []

  @property
  def runs(self) -> tuple[StepRun, ...]:
    return tuple(self._runs)

  @property
  def num_steps(self) -> int:
    return sum(run.count for run in self._runs)

  @property
  def neighbouring_relation(self) -> str:
    """'add_or_remove_one' for Poisson, 'replace_one' for shuffled."""
    return 'add_or_remove_one' if self.sampling == 'poisson' else 'replace_one'

  def record_step(self, noise_multiplier: float, sampling_prob: float) -> None:
    """Records one step that has been taken."""
    self.record_steps(noise_multiplier, sampling_prob, count=1)

  def record_steps(self, noise_multiplier: float, sampling_prob: float,
                   count: int) -> None:
    """Records ``count`` steps with the same noise and sampling rate."""
    noise_multiplier = float(noise_multiplier)
    sampling_prob = float(sampling_prob)
    if not noise_multiplier >= 0:
      raise ValueError(f'Expected {noise_multiplier=} >= 0')
    if not 0 < sampling_prob <= 1:
      raise ValueError(f'Expected 0 < {sampling_prob=} <= 1')
    if int(count) != count or count < 0:
      raise ValueError(f'Expected {count=} to be an integer >= 0')
    if count == 0:
      return
    last = self._runs[-1] if self._runs else None
    if last and (last.noise_multiplier, last.sampling_prob) == (
        noise_multiplier, sampling_prob):
      self._runs[-1] = last._replace(count=last.count + int(count))
    else:
      self._runs.append(StepRun(noise_multiplier, sampling_prob, int(count)))

  def _shuffled_epoch_noise_multipliers(self) -> list[tuple[float, int]]:
    """Run-length (z of the epoch, number of epochs) for shuffled sampling."""
    if self.steps_per_epoch is None:
      steps_per_epoch = _default_steps_per_epoch(self._runs)
      num_epochs = -(-self.num_steps // steps_per_epoch)
      return [(min(run.noise_multiplier for run in self._runs), num_epochs)]
    per_step_z = np.repeat([run.noise_multiplier for run in self._runs],
                           [run.count for run in self._runs])
    num_epochs = -(-len(per_step_z) // self.steps_per_epoch)
    padded = np.full(num_epochs * self.steps_per_epoch, np.inf)
    padded[:len(per_step_z)] = per_step_z
    epoch_z = padded.reshape(num_epochs, self.steps_per_epoch).min(axis=1)
    runs = []
    for z in epoch_z.tolist():
      if runs and runs[-1][0] == z:
        runs[-1] = (z, runs[-1][1] + 1)
      else:
        runs.append((z, 1))
    return runs

  def dp_event(self) -> dp_accounting.DpEvent:
    """The composition of all recorded steps as one dp-accounting event."""
    if not self._runs:
      return dp_accounting.NoOpDpEvent()
    if self.sampling == 'poisson':
      return _compose([
          dp_accounting.SelfComposedDpEvent(
              dp_accounting.PoissonSampledDpEvent(
                  run.sampling_prob,
                  dp_accounting.GaussianDpEvent(run.noise_multiplier)),
              run.count)
          for run in self._runs
      ])
    # Sensitivity 2C under replace-one: noise zC is z/2 units of 2C.
    return _compose([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.GaussianDpEvent(z / 2), num_epochs)
        for z, num_epochs in self._shuffled_epoch_noise_multipliers()
    ])

  def epsilon(self, delta: float, accountant: str = 'pld') -> float:
    """Epsilon at ``delta`` of the recorded steps (0 if none were taken)."""
    if not 0 < delta < 1:
      raise ValueError(f'Expected 0 < {delta=} < 1')
    if accountant not in ACCOUNTANTS:
      raise ValueError(
          f'Expected accountant in {ACCOUNTANTS}, got {accountant!r}')
    return event_epsilon(self.dp_event(), delta, accountant)

  def epsilons(self, delta: float) -> dict[str, float]:
    """Epsilon from every accountant, e.g. ``{'pld': ..., 'rdp': ...}``."""
    return {name: self.epsilon(delta, name) for name in ACCOUNTANTS}

  def to_dict(self) -> dict[str, Any]:
    """JSON-serialisable state, for checkpoints."""
    return {
        'format_version': _FORMAT_VERSION,
        'sampling': self.sampling,
        'steps_per_epoch': self.steps_per_epoch,
        'runs': [list(run) for run in self._runs],
    }

  @classmethod
  def from_dict(cls, state: dict[str, Any]) -> PrivacyLedger:
    """Inverse of :meth:`to_dict`."""
    version = state.get('format_version')
    if version != _FORMAT_VERSION:
      raise ValueError(
          f'Expected ledger format_version {_FORMAT_VERSION}, got {version!r}')
    ledger = cls(state['sampling'], state.get('steps_per_epoch'))
    for noise_multiplier, sampling_prob, count in state['runs']:
      ledger.record_steps(noise_multiplier, sampling_prob, count)
    return ledger

  def __repr__(self) -> str:
    return (f'PrivacyLedger(sampling={self.sampling!r}, '
            f'num_steps={self.num_steps}, runs={len(self._runs)})')


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sampling_prob: float,
    steps: int,
    accountant: str = 'pld',
    sampling: str = 'poisson',
    steps_per_epoch: int | None = None,
    relative_tolerance: float = 1e-3,
    min_noise_multiplier: float = MIN_NOISE_MULTIPLIER,
) -> float:
  """Smallest noise multiplier z whose epsilon at ``delta`` is <= the target.

  Brent's method on z (epsilon decreases as z grows), finished by bisection
  so that the answer is guaranteed, computed with the same ledger and
  accountant as training. The result z satisfies ``epsilon(z) <=
  target_epsilon`` (as computed), and some z' > z * (1 - relative_tolerance)
  has ``epsilon(z') > target_epsilon``.

  Args:
    target_epsilon: the epsilon budget, > 0.
    delta: the delta, in (0, 1).
    sampling_prob: q (Poisson rate, or batch_size / N for shuffled).
    steps: number of training steps.
    accountant: 'pld' or 'rdp'.
    sampling: 'poisson' or 'shuffled', as in :class:`PrivacyLedger`.
    steps_per_epoch: for 'shuffled', as in :class:`PrivacyLedger`.
    relative_tolerance: bisection stops when the bracket is this tight.
    min_noise_multiplier: the smallest z considered; a target met at that z raises
      :class:`EssentiallyNoPrivacy` at once instead of searching smaller z (slow, and
      meaningless as privacy).

  Returns:
    The noise multiplier z as a float, >= ``min_noise_multiplier``.

  Raises:
    EssentiallyNoPrivacy: ``epsilon(min_noise_multiplier) <= target_epsilon``.
  """
  if not target_epsilon > 0:
    raise ValueError(f'Expected {target_epsilon=} > 0')
  if steps < 1:
    raise ValueError(f'Expected {steps=} >= 1')

  epsilons = {}

  def epsilon_gap(noise_multiplier: float) -> float:
    if noise_multiplier not in epsilons:  # each costs ~0.1 s with PLD
      ledger = PrivacyLedger(sampling, steps_per_epoch)
      ledger.record_steps(noise_multiplier, sampling_prob, steps)
      epsilons[noise_multiplier] = ledger.epsilon(delta, accountant)
    return epsilons[noise_multiplier] - target_epsilon

  if epsilon_gap(min_noise_multiplier) <= 0:
    raise EssentiallyNoPrivacy(
        f'epsilon {target_epsilon:g} at delta {delta:g} needs a noise multiplier below '
        f'{min_noise_multiplier:g} (epsilon there: {epsilons[min_noise_multiplier]:.3g}): '
        'essentially no privacy')
  # Bracket: epsilon(low) > target >= epsilon(high), low >= min_noise_multiplier.
  high = max(1.0, min_noise_multiplier)
  while epsilon_gap(high) > 0:
    high *= 2
    if high > 2**30:
      raise ValueError(
          f'Cannot reach {target_epsilon=} at {delta=} with any noise'
          f' multiplier up to 2**30 ({steps=}, {sampling_prob=})')
  low = max(high / 2, min_noise_multiplier)
  while epsilon_gap(low) <= 0:  # Ends at the latest at min_noise_multiplier (checked above).
    high, low = low, max(low / 2, min_noise_multiplier)
  try:  # Brent converges in a few steps; bisection below certifies it.
    optimize.brentq(epsilon_gap, low, high,
                    xtol=relative_tolerance * low / 4, maxiter=50)
  except (ValueError, RuntimeError):
    pass
  high = min(z for z, eps in epsilons.items() if eps <= target_epsilon)
  low = max(z for z, eps in epsilons.items()
            if eps > target_epsilon and z < high)
  while high - low > relative_tolerance * high:
    middle = (low + high) / 2
    if epsilon_gap(middle) <= 0:
      high = middle
    else:
      low = middle
  return high
