"""Privacy accounting: a ledger of the DP-SGD steps actually taken.

:class:`PrivacyLedger` stores the steps run-length encoded, as
``(noise_multiplier, sampling_prob, count)`` runs, plus any one-off Gaussian
mechanisms released on the whole data set (say privately estimated feature
normalisation statistics, :meth:`PrivacyLedger.record_gaussian`), turns them
into one dp-accounting ``DpEvent`` and asks a PLD or RDP accountant for
epsilon. Record a step only after it has been taken, save ``to_dict()`` with
every checkpoint and restore with ``from_dict()``: a resumed run then never
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

A one-off Gaussian mechanism recorded with noise multiplier z (noise std z
times the query's add/remove sensitivity) is ``GaussianDpEvent(z)`` in a
Poisson ledger and, by the same folding, ``GaussianDpEvent(z / 2)`` in a
shuffled one (replace-one doubles the sensitivity).

>>> ledger = PrivacyLedger('poisson')
>>> ledger.record_steps(noise_multiplier=5.002, sampling_prob=128 / 5218,
...                     count=2038)
>>> round(ledger.epsilon(delta=1e-4, accountant='pld'), 2)
0.69
"""

from __future__ import annotations

from collections.abc import Sequence
import logging
import math
from typing import Any, NamedTuple

import dp_accounting
from dp_accounting.pld import common as pld_common
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.pld import privacy_loss_mechanism
from dp_accounting.rdp import rdp_privacy_accountant
import numpy as np
from scipy import optimize

from dpjax import absl_logs

SAMPLINGS = ('poisson', 'shuffled')
ACCOUNTANTS = ('pld', 'rdp')

# PLD grid step for the privacy loss, relative to max(1, epsilon): 1e-4 (the
# dp-accounting default) for epsilon <= 1, e.g. the paper settings (about
# 0.1 s each, matching FACTS.md to 1e-3); coarser for large epsilon, where a
# fixed 1e-4 grid takes seconds. The epsilon that sizes the grid is an RDP
# bound (analytic, ~20 ms), and the grid is sized before it is built (see
# _pld_interval). PLD rounds pessimistically, so every grid gives an upper bound.
PLD_RELATIVE_DISCRETIZATION = 1e-4
# Where the PLD cannot be computed within bounded time and memory and the RDP bound is above
# this, the RDP bound is returned for accountant='pld' too: no privacy is left to refine.
PLD_MAX_EPSILON = 100.0
# RDP orders: dense near 1 (small epsilon), integers up to 63, a few large.
RDP_ORDERS = tuple(rdp_privacy_accountant.DEFAULT_RDP_ORDERS)

_FORMAT_VERSION = 2
_READABLE_FORMAT_VERSIONS = (1, 2)  # Version 1 had no Gaussian events.

# Calibration never answers below this noise multiplier: a target that needs less noise is
# "essentially no privacy" (even one Gaussian step at z = 0.3 is epsilon ~ 18 at delta 1e-5),
# and the accountants get slow as z shrinks. Raised as EssentiallyNoPrivacy, at once.
MIN_NOISE_MULTIPLIER = 0.3
# A noise multiplier below this is accounted as no noise at all (epsilon = inf): the
# accountants' formulas divide by z**2 and overflow long before z = 0.
_MIN_ACCOUNTED_NOISE_MULTIPLIER = 1e-6

# Budget of one PLD evaluation: at most this many grid points (estimated, see
# _composed_loss_range, which overestimates about 2x) in the PMFs composed together, in one
# of the two directions. A point costs ~90 bytes at the peak of dp-accounting's FFTs;
# measured at the limit: +0.3 GB and ~2 s.
_PLD_MAX_POINTS = 6_000_000
# ... FFTs of at most this many points in all while composing the components ...
_PLD_MAX_WORK = 2 * _PLD_MAX_POINTS
# ... and at most this many points in the single-step PMFs, built at ~10 us a point, for each
# direction (~1.3 s in all).
_PLD_MAX_SINGLE_POINTS = 2**16
# The grid step never exceeds this, nor _PLD_MAX_RELATIVE_DISCRETIZATION * max(1, epsilon).
_PLD_MAX_INTERVAL = 1.0
_PLD_MAX_RELATIVE_DISCRETIZATION = 1e-2
# At most this many distinct (q, z) Poisson runs are composed by the PLD accountant.
_PLD_MAX_COMPONENTS = 32
# dp-accounting self-composes a PMF of at most 1000 points ("sparse") after computing
# size ** count as a Python int: minutes for count = 1e9, ignoring Ctrl-C. Runs this long get
# a grid fine enough for more than 1000 points (the dense FFT path, any count).
_PLD_DENSE_STEPS = 300_000
_PLD_SPARSE_MAX_SIZE = 1000
# dp-accounting's defaults for Gaussian PLDs: noise tails beyond exp(-50) go to infinity
# (pessimistic), and a self-composition truncates 1e-15 of mass.
_LOG_MASS_TRUNCATION = -50.0
_TAIL_MASS_TRUNCATION = 1e-15
# Orders of the cheap RDP bound that sizes the PLD grid: no fractional orders near 1 (the
# slow ones), so it is >= the full RDP bound, and equal to it for epsilon below ~10.
_SIZING_RDP_ORDERS = (1.5, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64,
                      96, 128, 256, 512, 1024)


class EssentiallyNoPrivacy(ValueError):
  """The target epsilon is reached with less noise than MIN_NOISE_MULTIPLIER."""


class AccountingTooCostly(ValueError):
  """PLD accounting of this event would not finish in bounded time and memory."""


class StepRun(NamedTuple):
  """``count`` consecutive steps with the same noise and sampling rate."""

  noise_multiplier: float
  sampling_prob: float
  count: int


class GaussianEvent(NamedTuple):
  """``count`` releases of a Gaussian mechanism on the whole data set, named ``name``."""

  name: str
  noise_multiplier: float
  count: int


def as_real_scalar(name: str, value: Any) -> float:
  """``value`` as a float: a real Python, NumPy or 0-d JAX scalar, never a bool."""
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f'Expected {name} to be a number, got the bool {value!r}')
  try:
    array = np.asarray(value)
  except Exception as e:  # E.g. a JAX tracer: accounting needs concrete numbers.
    raise ValueError(f'Expected {name} to be a concrete real number, got {value!r}') from e
  if array.shape != () or not (np.issubdtype(array.dtype, np.integer)
                               or np.issubdtype(array.dtype, np.floating)):
    raise ValueError(f'Expected {name} to be a real scalar, got {value!r}')
  return float(array)


def _as_int(name: str, value: Any, minimum: int) -> int:
  """``value`` as an int >= minimum; integral floats are accepted, bools and NaN are not."""
  number = as_real_scalar(name, value)
  if not math.isfinite(number) or number != math.floor(number):
    raise ValueError(f'Expected {name} to be an integer, got {value!r}')
  array = np.asarray(value)
  integer = int(array) if np.issubdtype(array.dtype, np.integer) else int(number)
  if integer < minimum:
    raise ValueError(f'Expected {name}={integer} to be an integer >= {minimum}')
  return integer


def check_delta(delta: Any) -> float:
  delta = as_real_scalar('delta', delta)
  if not 0 < delta < 1:
    raise ValueError(f'Expected 0 < {delta=} < 1')
  return delta


def _check_noise_multiplier(name: str, value: Any) -> float:
  value = as_real_scalar(name, value)
  if not (math.isfinite(value) and value >= 0):
    raise ValueError(f'Expected {name}={value} to be finite and >= 0')
  return value


def _check_sampling_prob(value: Any) -> float:
  sampling_prob = as_real_scalar('sampling_prob', value)
  if not 0 < sampling_prob <= 1:
    raise ValueError(f'Expected 0 < {sampling_prob=} <= 1')
  return sampling_prob


def make_accountant(
    accountant: str = 'pld',
    pld_value_discretization_interval: float = PLD_RELATIVE_DISCRETIZATION,
    rdp_orders: Sequence[float] = RDP_ORDERS,
) -> dp_accounting.PrivacyAccountant:
  """A fresh PLD or RDP accountant with add/remove-one relation."""
  relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
  if accountant == 'pld':
    return pld_privacy_accountant.PLDAccountant(
        neighboring_relation=relation,
        value_discretization_interval=pld_value_discretization_interval)
  if accountant == 'rdp':
    return rdp_privacy_accountant.RdpAccountant(
        orders=list(rdp_orders), neighboring_relation=relation)
  raise ValueError(f'Expected accountant in {ACCOUNTANTS}, got {accountant!r}')


class _Components(NamedTuple):
  """An event as independent parts: one Gaussian (all unsampled Gaussians merged) and
  Poisson-sampled Gaussian runs ``{(q, z): count}`` in order of first appearance."""

  gaussian_noise_multiplier: float | None  # None: no unsampled Gaussian.
  poisson: dict[tuple[float, float], int]
  non_private: bool  # Some part has (next to) no noise: epsilon is infinite.

  def event(self) -> dp_accounting.DpEvent:
    events = []
    if self.gaussian_noise_multiplier is not None:
      events.append(dp_accounting.GaussianDpEvent(self.gaussian_noise_multiplier))
    for (q, z), count in self.poisson.items():
      step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
      events.append(step if count == 1 else dp_accounting.SelfComposedDpEvent(step, count))
    return _compose(events)


def _components(event: dp_accounting.DpEvent) -> _Components:
  """Splits ``event`` into :class:`_Components` (an exact rewriting).

  Gaussian mechanisms of noise multipliers z_i (sensitivity 1 each) compose to exactly one
  Gaussian with 1 / z**2 = sum 1 / z_i**2 (their privacy-loss distributions are Gaussian and
  add up), and Poisson sampling at q = 1 is no sampling; composition is commutative, so equal
  (q, z) runs are merged. Raises ValueError for event types a ledger never makes.
  """
  gaussians: list[tuple[float, int]] = []
  poisson: dict[tuple[float, float], int] = {}
  non_private = False

  def visit(node: dp_accounting.DpEvent, count: int) -> None:
    nonlocal non_private
    if isinstance(node, dp_accounting.NoOpDpEvent) or count == 0:
      return
    if isinstance(node, dp_accounting.ComposedDpEvent):
      for child in node.events:
        visit(child, count)
    elif isinstance(node, dp_accounting.SelfComposedDpEvent):
      visit(node.event, count * int(node.count))
    elif isinstance(node, dp_accounting.GaussianDpEvent):
      z = float(node.noise_multiplier)
      if z < _MIN_ACCOUNTED_NOISE_MULTIPLIER:
        non_private = True
      else:
        gaussians.append((z, count))
    elif (isinstance(node, dp_accounting.PoissonSampledDpEvent)
          and isinstance(node.event, dp_accounting.GaussianDpEvent)):
      q, z = float(node.sampling_probability), float(node.event.noise_multiplier)
      if q == 0:
        return
      if z < _MIN_ACCOUNTED_NOISE_MULTIPLIER:
        non_private = True
      elif q == 1:
        gaussians.append((z, count))
      else:
        poisson[(q, z)] = poisson.get((q, z), 0) + count
    else:
      raise ValueError(
          'Expected an event made of Gaussian, Poisson-sampled Gaussian, composed and '
          f'self-composed events, got {type(node).__name__}')

  visit(event, 1)
  if not gaussians:
    gaussian_z = None
  elif len(gaussians) == 1 and gaussians[0][1] == 1:
    gaussian_z = gaussians[0][0]
  else:
    gaussian_z = 1 / math.sqrt(sum(count / z**2 for z, count in gaussians))
  return _Components(gaussian_z, poisson, non_private)


def _rdp_epsilon(event: dp_accounting.DpEvent, delta: float,
                 orders: Sequence[float] = RDP_ORDERS) -> float:
  with absl_logs.errors_only():
    return float(make_accountant('rdp', rdp_orders=orders).compose(event).get_epsilon(delta))


def _loss_ranges(noise_multiplier: float, sampling_prob: float) -> tuple[float, float]:
  """Widths of the privacy-loss supports of one step as dp-accounting discretises them, for
  its remove and add PMFs (each covers width / interval + 2 grid points at most)."""
  widths = []
  for adjacency in (privacy_loss_mechanism.AdjacencyType.REMOVE,
                    privacy_loss_mechanism.AdjacencyType.ADD):
    bounds = privacy_loss_mechanism.GaussianPrivacyLoss(
        noise_multiplier, sampling_prob=sampling_prob, adjacency_type=adjacency,
        log_mass_truncation_bound=_LOG_MASS_TRUNCATION).connect_dots_bounds()
    widths.append(float(bounds.epsilon_upper) - float(bounds.epsilon_lower))
  return widths[0], widths[1]


def _composed_loss_range(noise_multiplier: float, sampling_prob: float, count: int) -> float:
  """Estimated width, in loss units, of the support dp-accounting keeps for ``count``
  self-composed Poisson-sampled Gaussian steps (the larger of its remove and add PMFs).

  dp-accounting bounds the composed support with Chernoff bounds at orders j / (single-step
  width), j = 1..20; in loss units the result hardly depends on the grid step. It is
  computed here on a 2000-point grid: the pessimistic connect-the-dots PMF whose
  hockey-stick curve passes through delta(eps) at the grid points (masses above grid point
  k: A_k = (f_k - e^-h f_(k+1)) / (1 - e^-h), f_k = delta_k - delta_last, step h). Only
  sizes the grid; it decides nothing about privacy.
  """
  widths = []
  for adjacency in (privacy_loss_mechanism.AdjacencyType.REMOVE,
                    privacy_loss_mechanism.AdjacencyType.ADD):
    loss = privacy_loss_mechanism.GaussianPrivacyLoss(
        noise_multiplier, sampling_prob=sampling_prob, adjacency_type=adjacency,
        log_mass_truncation_bound=_LOG_MASS_TRUNCATION)
    bounds = loss.connect_dots_bounds()
    low, high = float(bounds.epsilon_lower), float(bounds.epsilon_upper)
    if not high > low:
      widths.append(0.0)
      continue
    step = (high - low) / 2000
    grid = np.arange(math.floor(low / step), math.ceil(high / step) + 1) * step
    deltas = np.minimum.accumulate(np.asarray(loss.get_delta_for_epsilon(grid), np.float64))
    excess = deltas - deltas[-1]
    above = np.append((excess[:-1] - math.exp(-step) * excess[1:]) / -math.expm1(-step), 0.0)
    probs = np.maximum(np.append(1 - deltas[-1] - above[0], -np.diff(above)), 0.0)
    lower, upper = pld_common.compute_self_convolve_bounds(probs, count, _TAIL_MASS_TRUNCATION)
    widths.append((upper - lower + 1) * step)
  return max(widths)


def _pld_interval(components: _Components, epsilon_estimate: float) -> tuple[float, str]:
  """The PLD grid step for ``components``, and '' or why no step fits the budget.

  The step starts at PLD_RELATIVE_DISCRETIZATION * max(1, epsilon_estimate). It is refined
  where a run of >= _PLD_DENSE_STEPS steps needs a dense PMF, and coarsened (up to
  _PLD_MAX_RELATIVE_DISCRETIZATION * max(1, epsilon) and _PLD_MAX_INTERVAL) where the
  PMFs would exceed _PLD_MAX_POINTS grid points (estimated by _composed_loss_range), their
  compositions _PLD_MAX_WORK, or the single-step PMFs _PLD_MAX_SINGLE_POINTS. Any step gives
  an upper bound.
  """
  scale = max(1.0, epsilon_estimate)
  interval = PLD_RELATIVE_DISCRETIZATION * scale
  largest = min(_PLD_MAX_INTERVAL, _PLD_MAX_RELATIVE_DISCRETIZATION * scale)
  if len(components.poisson) > _PLD_MAX_COMPONENTS:
    return interval, (f'{len(components.poisson)} distinct (sampling_prob, noise_multiplier) '
                      f'runs, more than the {_PLD_MAX_COMPONENTS} composed with PLD')
  # The remove and add PMFs are built, self-composed and composed one after the other, and
  # have equal supports: the budgets are on one direction. In loss units, per component:
  # the width of one step's PMF (built point by point, ~10 us a point) and of its
  # composition (composed_width, estimated); the composed PMF spans their sum, and each
  # composition costs an FFT the size of the PMF composed so far.
  single_width = 0.0
  composed_width = 0.0
  work_width = 0.0
  why_fine = ''
  widths = []
  if components.gaussian_noise_multiplier is not None:
    widths.append((max(_loss_ranges(components.gaussian_noise_multiplier, 1.0)),) * 2)
  for (q, z), count in components.poisson.items():
    singles = _loss_ranges(z, q)
    # The estimate was within 1.6x of dp-accounting's width in a sweep over z, q, count.
    composed = 2 * _composed_loss_range(z, q, count) if count > 1 else 0.0
    widths.append((max(singles), max(*singles, composed)))
    if count >= _PLD_DENSE_STEPS:
      dense = min(singles) / (_PLD_SPARSE_MAX_SIZE + 24)
      if dense < largest:
        largest, why_fine = dense, f'a dense grid for {count} steps'
  for single, composed in widths:
    single_width += single
    composed_width += composed
    work_width += composed_width
  extra = 2 * len(widths)  # Rounding: up to 2 points more per PMF.
  smallest = max(composed_width / max(1, _PLD_MAX_POINTS - extra),
                 work_width / max(1, _PLD_MAX_WORK - extra * len(widths)),
                 single_width / max(1, _PLD_MAX_SINGLE_POINTS - extra))
  if not smallest <= largest:
    reason = why_fine or f'a grid step of at most {largest:.3g}'
    if largest <= 0:
      return interval, f'{reason} needs a grid step of 0'
    return interval, (
        f'{reason} needs about {composed_width / largest + extra:.3g} grid points (budget '
        f'{_PLD_MAX_POINTS}), {single_width / largest + extra:.3g} for single steps (budget '
        f'{_PLD_MAX_SINGLE_POINTS}) and FFTs of {work_width / largest:.3g} points in all '
        f'(budget {_PLD_MAX_WORK})')
  return min(max(interval, smallest), largest), ''


def event_epsilon(event: dp_accounting.DpEvent, delta: float,
                  accountant: str = 'pld') -> float:
  """Epsilon of ``event`` at ``delta`` under add/remove-one, with bounded time and memory.

  The event is first rewritten exactly (:func:`_components`: unsampled Gaussians merged into
  one, equal Poisson runs merged). 'rdp' is dp-accounting's RDP bound over RDP_ORDERS. For
  'pld', a cheap RDP bound sizes the grid: step PLD_RELATIVE_DISCRETIZATION * max(1, eps)
  (so 1e-4, dp-accounting's default, for epsilon <= 1), and the PMFs' sizes are estimated
  before any is built (:func:`_pld_interval`). dp-accounting's PLD is pessimistic, so every
  grid gives an upper bound on epsilon.

  Where no grid fits the budget (_PLD_MAX_POINTS points: a few seconds and well under
  1 GB; in practice runs of more than ~1e6 steps, or more than _PLD_MAX_COMPONENTS distinct
  (q, z) runs), an RDP bound above PLD_MAX_EPSILON is returned for 'pld' too (a valid upper
  bound; no privacy is left to refine); below it, :class:`AccountingTooCostly` (a
  ValueError) is raised: use accountant='rdp'.

  Returns:
    epsilon (0.0 for no event, inf for an event with a noise multiplier below 1e-6).
  """
  delta = check_delta(delta)
  if accountant not in ACCOUNTANTS:
    raise ValueError(f'Expected accountant in {ACCOUNTANTS}, got {accountant!r}')
  components = _components(event)
  if components.non_private:
    return math.inf
  if components.gaussian_noise_multiplier is None and not components.poisson:
    return 0.0
  canonical = components.event()
  if accountant == 'rdp':
    return _rdp_epsilon(canonical, delta)
  estimate = _rdp_epsilon(canonical, delta, _SIZING_RDP_ORDERS)
  if not math.isfinite(estimate):
    return math.inf
  interval, refusal = _pld_interval(components, estimate)
  if refusal:
    if estimate > PLD_MAX_EPSILON:
      logging.getLogger(__name__).info(
          'PLD accounting skipped (%s); epsilon is the RDP bound', refusal)
      return _rdp_epsilon(canonical, delta)
    raise AccountingTooCostly(
        f'PLD accounting of this event cannot finish quickly: {refusal} (its RDP bound is '
        f'epsilon {estimate:.4g}); use accountant="rdp"')
  pld = make_accountant('pld', interval).compose(canonical)
  return float(pld.get_epsilon(delta))


# How :func:`replace_one_event_epsilon` bounds epsilon, recorded beside the number.
REPLACE_ONE_PLD = ('dp-accounting PLD, REPLACE_ONE: each Poisson-sampled step as '
                   'q N(C) + (1-q) N(0) vs q N(-C) + (1-q) N(0), unsampled Gaussians at twice '
                   'their sensitivity')
REPLACE_ONE_GROUP = 'group privacy of size 2 (remove, then add) over the add/remove RDP bound'


def _group_of_two_epsilon(event: dp_accounting.DpEvent, delta: float) -> float:
  """A replace-one epsilon from the add/remove RDP bound, by group privacy of size 2.

  Replacing a unit is removing it and adding another: if each hop is (e_1, d_1)- and
  (e_2, d_2)-DP, P(S) <= e^e_1 (e^e_2 P'(S) + d_2) + d_1. The split of delta is searched on a
  few points; every one gives an upper bound.
  """
  best = math.inf
  for fraction in (0.5, 0.25, 0.1, 0.01):
    delta_1 = fraction * delta
    epsilon_1 = _rdp_epsilon(event, delta_1)
    delta_2 = (delta - delta_1) * math.exp(-epsilon_1) if math.isfinite(epsilon_1) else 0.0
    if delta_2 > 0:
      best = min(best, epsilon_1 + _rdp_epsilon(event, delta_2))
  return best


def replace_one_event_epsilon(event: dp_accounting.DpEvent,
                              delta: float) -> tuple[float, str]:
  """(epsilon, method) of ``event`` at ``delta`` when one unit is REPLACED by another.

  ``event`` is what a Poisson :class:`PrivacyLedger` makes (Poisson-sampled and unsampled
  Gaussians, add/remove sensitivity 1 per unit). Replace-one is the relation that holds when
  the number of units is known (published, or used to set the sampling rate, steps and noise):
  neighbours then have the same count. Method: :data:`REPLACE_ONE_PLD` where the PLD grid fits
  the same time and memory budget as :func:`event_epsilon`, else :data:`REPLACE_ONE_GROUP`
  (looser, always computable). Both are upper bounds.
  """
  delta = check_delta(delta)
  components = _components(event)
  if components.non_private:
    return math.inf, REPLACE_ONE_PLD
  if components.gaussian_noise_multiplier is None and not components.poisson:
    return 0.0, REPLACE_ONE_PLD
  canonical = components.event()
  add_remove = _rdp_epsilon(canonical, delta, _SIZING_RDP_ORDERS)
  if not math.isfinite(add_remove):
    return math.inf, REPLACE_ONE_PLD
  # A replaced unit moves a sum by up to 2C: the grid is sized as for half the noise (the
  # supports of the replace-one losses are no wider), at twice the add/remove epsilon.
  gz = components.gaussian_noise_multiplier
  doubled = _Components(None if gz is None else gz / 2,
                        {(q, z / 2): count for (q, z), count in components.poisson.items()}, False)
  interval, refusal = _pld_interval(doubled, 2 * add_remove)
  if refusal:
    return _group_of_two_epsilon(canonical, delta), REPLACE_ONE_GROUP
  accountant = pld_privacy_accountant.PLDAccountant(
      neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE,
      value_discretization_interval=interval)
  return float(accountant.compose(canonical).get_epsilon(delta)), REPLACE_ONE_PLD


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


def _shuffled_epochs(runs: list[StepRun], steps_per_epoch: int) -> list[tuple[float, int]]:
  """Run-length (z of the epoch, number of epochs): each epoch, partial ones included, with
  the smallest z of its steps. Works on the runs (never one entry per step or epoch)."""
  segments: list[list] = []  # [first epoch, last epoch, z], contiguous and increasing
  start = 0
  for run in runs:
    end = start + run.count
    first, last = start // steps_per_epoch, (end - 1) // steps_per_epoch
    z = run.noise_multiplier
    if segments and segments[-1][1] == first:  # This run ends an epoch begun earlier.
      low, high, shared_z = segments.pop()
      if low < first:
        segments.append([low, first - 1, shared_z])
      segments.append([first, first, min(shared_z, z)])
      first += 1
    if first <= last:
      segments.append([first, last, z])
    start = end
  epochs: list[tuple[float, int]] = []
  for low, high, z in segments:
    if epochs and epochs[-1][0] == z:
      epochs[-1] = (z, epochs[-1][1] + high - low + 1)
    else:
      epochs.append((z, high - low + 1))
  return epochs


class PrivacyLedger:
  """Record of the DP-SGD steps taken and one-off Gaussian releases, and their privacy cost.

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
    ``epsilon(delta)`` bounds the (epsilon, delta)-DP of everything recorded, composed,
    under ``neighbouring_relation`` of one privacy unit, provided each recorded step added
    N(0, (zC)^2) to a sum of per-unit gradients clipped to norm C, with batches drawn as
    ``sampling`` says, independently of the noise, and each :meth:`record_gaussian` release
    added N(0, (z S)^2) to a query of add/remove-one sensitivity S, with fresh noise.
  """

  def __init__(self, sampling: str = 'poisson',
               steps_per_epoch: int | None = None):
    if sampling not in SAMPLINGS:
      raise ValueError(f'Expected sampling in {SAMPLINGS}, got {sampling!r}')
    if steps_per_epoch is not None:
      if sampling != 'shuffled':
        raise ValueError('steps_per_epoch only applies to sampling="shuffled"')
      steps_per_epoch = _as_int('steps_per_epoch', steps_per_epoch, minimum=1)
    self.sampling = sampling
    self.steps_per_epoch = steps_per_epoch
    self._runs: list[StepRun] = []
    self._gaussian_events: list[GaussianEvent] = []

  @property
  def runs(self) -> tuple[StepRun, ...]:
    return tuple(self._runs)

  @property
  def gaussian_events(self) -> tuple[GaussianEvent, ...]:
    """The one-off Gaussian releases recorded, in order, as (name, noise_multiplier, count)."""
    return tuple(self._gaussian_events)

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
    """Records ``count`` steps with the same noise and sampling rate.

    ``noise_multiplier`` must be finite and >= 0 (0: no noise, epsilon inf), ``sampling_prob``
    in (0, 1], ``count`` an integer >= 0; Python, NumPy and 0-d JAX scalars are accepted,
    bools are not.
    """
    noise_multiplier = _check_noise_multiplier('noise_multiplier', noise_multiplier)
    sampling_prob = _check_sampling_prob(sampling_prob)
    count = _as_int('count', count, minimum=0)
    if count == 0:
      return
    last = self._runs[-1] if self._runs else None
    if last and (last.noise_multiplier, last.sampling_prob) == (
        noise_multiplier, sampling_prob):
      self._runs[-1] = last._replace(count=last.count + count)
    else:
      self._runs.append(StepRun(noise_multiplier, sampling_prob, count))

  def record_gaussian(self, noise_multiplier: float, name: str, count: int = 1) -> None:
    """Records ``count`` releases of a Gaussian mechanism on the whole data set.

    For a query computed on the WHOLE data set (no subsampling) with L2 sensitivity S to
    adding or removing one privacy unit, released with noise N(0, (z S)^2 I) (z = the
    ``noise_multiplier``: noise std in units of the sensitivity), e.g. private feature
    normalisation statistics (:func:`dpjax.feature_stats.private_feature_stats`) released
    once before training. Record it after the release, like a step.

    Event: ``GaussianDpEvent(z)`` for ``'poisson'`` (add/remove-one relation). For
    ``'shuffled'`` the ledger's relation is replace-one, under which the sensitivity is at
    most 2S (one unit removed, another added); as for the epochs, the factor 2 is folded
    into the noise multiplier: ``GaussianDpEvent(z / 2)``, fed to the accountants with their
    add/remove relation (a shift of one noise unit).

    Args:
      noise_multiplier: z, finite and >= 0 (0: no noise, epsilon inf).
      name: what was released (kept in :attr:`gaussian_events` and :meth:`to_dict`).
      count: how many such releases, each with fresh noise; an integer >= 1.
    """
    noise_multiplier = _check_noise_multiplier('noise_multiplier', noise_multiplier)
    if not isinstance(name, str) or not name:
      raise ValueError(f'Expected name to be a non-empty string, got {name!r}')
    count = _as_int('count', count, minimum=1)
    self._gaussian_events.append(GaussianEvent(name, noise_multiplier, count))

  def _shuffled_epoch_noise_multipliers(self) -> list[tuple[float, int]]:
    """Run-length (z of the epoch, number of epochs) for shuffled sampling."""
    if not self._runs:
      return []
    if self.steps_per_epoch is None:
      steps_per_epoch = _default_steps_per_epoch(self._runs)
      num_epochs = -(-self.num_steps // steps_per_epoch)
      return [(min(run.noise_multiplier for run in self._runs), num_epochs)]
    return _shuffled_epochs(self._runs, self.steps_per_epoch)

  def _gaussian_dp_events(self) -> list[dp_accounting.DpEvent]:
    # Replace-one (shuffled) doubles the sensitivity: noise zS is z/2 units of 2S.
    scale = 1.0 if self.sampling == 'poisson' else 0.5
    events = []
    for event in self._gaussian_events:
      gaussian = dp_accounting.GaussianDpEvent(event.noise_multiplier * scale)
      events.append(gaussian if event.count == 1 else
                    dp_accounting.SelfComposedDpEvent(gaussian, event.count))
    return events

  def dp_event(self) -> dp_accounting.DpEvent:
    """Everything recorded as one dp-accounting event: the one-off Gaussian releases first
    (in recording order), then the steps."""
    events = self._gaussian_dp_events()
    if self.sampling == 'poisson':
      events += [
          dp_accounting.SelfComposedDpEvent(
              dp_accounting.PoissonSampledDpEvent(
                  run.sampling_prob,
                  dp_accounting.GaussianDpEvent(run.noise_multiplier)),
              run.count)
          for run in self._runs
      ]
    else:
      # Sensitivity 2C under replace-one: noise zC is z/2 units of 2C.
      events += [
          dp_accounting.SelfComposedDpEvent(
              dp_accounting.GaussianDpEvent(z / 2), num_epochs)
          for z, num_epochs in self._shuffled_epoch_noise_multipliers()
      ]
    return _compose(events)

  def epsilon(self, delta: float, accountant: str = 'pld') -> float:
    """Epsilon at ``delta`` of everything recorded (0 if nothing), via :func:`event_epsilon`:
    bounded time and memory; may raise :class:`AccountingTooCostly` for 'pld'."""
    delta = check_delta(delta)
    if accountant not in ACCOUNTANTS:
      raise ValueError(
          f'Expected accountant in {ACCOUNTANTS}, got {accountant!r}')
    return event_epsilon(self.dp_event(), delta, accountant)

  def replace_one_epsilon(self, delta: float, accountant: str = 'pld') -> tuple[float, str]:
    """(epsilon, method) at ``delta`` for one unit replaced by another (the count fixed).

    What holds once the number of units is public: add/remove neighbours differ in it, so a
    published count (or a sampling rate, step count or noise derived from it) tells them
    apart. A ``'shuffled'`` ledger is replace-one already: its :meth:`epsilon` by
    ``accountant``. A Poisson ledger: :func:`replace_one_event_epsilon`.
    """
    delta = check_delta(delta)
    if accountant not in ACCOUNTANTS:
      raise ValueError(f'Expected accountant in {ACCOUNTANTS}, got {accountant!r}')
    if self.sampling == 'shuffled':
      return self.epsilon(delta, accountant), f'the {accountant.upper()} epsilon (replace-one already)'
    return replace_one_event_epsilon(self.dp_event(), delta)

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
        'gaussian_events': [event._asdict() for event in self._gaussian_events],
    }

  @classmethod
  def from_dict(cls, state: dict[str, Any]) -> PrivacyLedger:
    """Inverse of :meth:`to_dict`; also reads format version 1 (no Gaussian events)."""
    version = state.get('format_version')
    if isinstance(version, bool) or version not in _READABLE_FORMAT_VERSIONS:
      raise ValueError(
          f'Expected ledger format_version in {_READABLE_FORMAT_VERSIONS}, got {version!r}')
    ledger = cls(state['sampling'], state.get('steps_per_epoch'))
    if version >= 2 and 'gaussian_events' not in state:
      # A truncated or edited checkpoint must not under-report: version 2 always writes them.
      raise ValueError('Expected the gaussian_events of a format_version 2 ledger')
    for event in state['gaussian_events'] if version >= 2 else []:
      ledger.record_gaussian(event['noise_multiplier'], event['name'], event['count'])
    for noise_multiplier, sampling_prob, count in state['runs']:
      ledger.record_steps(noise_multiplier, sampling_prob, count)
    return ledger

  def __repr__(self) -> str:
    return (f'PrivacyLedger(sampling={self.sampling!r}, '
            f'num_steps={self.num_steps}, runs={len(self._runs)}, '
            f'gaussian_events={len(self._gaussian_events)})')


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
    *,
    extra_gaussian_noise_multipliers: Sequence[float] = (),
) -> float:
  """Smallest noise multiplier z whose epsilon at ``delta`` is <= the target.

  Brent's method on z (epsilon decreases as z grows), finished by bisection
  so that the answer is guaranteed, computed with the same ledger and
  accountant as training. (Not `dp_accounting.calibrate_dp_mechanism`, which certifies the
  same "epsilon <= target": its tolerance is absolute in z while a noise multiplier is only
  meaningful relative to its size, it searches down to z = 0 where a target met at
  ``min_noise_multiplier`` should stop with EssentiallyNoPrivacy, and the epsilon here must be
  the ledger's own (shuffled sampling, extra releases, RDP or PLD) so that calibration and
  training can never disagree. The two agree where both apply: accounting_test.py.) The result z satisfies ``epsilon(z) <=
  target_epsilon`` (as computed), and some z' > z * (1 - relative_tolerance)
  has ``epsilon(z') > target_epsilon``. epsilon(z) is that of a ledger with ``steps`` steps
  at (z, ``sampling_prob``) and, first, one :meth:`PrivacyLedger.record_gaussian` release per
  entry of ``extra_gaussian_noise_multipliers``: the TOTAL meets the target.

  Args:
    target_epsilon: the epsilon budget, finite and > 0.
    delta: the delta, in (0, 1).
    sampling_prob: q in (0, 1] (Poisson rate, or batch_size / N for shuffled).
    steps: number of training steps, an integer >= 1.
    accountant: 'pld' or 'rdp'.
    sampling: 'poisson' or 'shuffled', as in :class:`PrivacyLedger`.
    steps_per_epoch: for 'shuffled', as in :class:`PrivacyLedger`.
    relative_tolerance: bisection stops when the bracket is this tight; in [1e-9, 1).
    min_noise_multiplier: the smallest z considered (finite, > 0); a target met at that z
      raises :class:`EssentiallyNoPrivacy` at once instead of searching smaller z (slow, and
      meaningless as privacy).
    extra_gaussian_noise_multipliers: noise multipliers of one-off Gaussian releases on the
      whole data set that share the budget (e.g. feature normalisation statistics), each
      recorded as the ledger's ``record_gaussian`` records it.

  Returns:
    The noise multiplier z as a float, >= ``min_noise_multiplier``.

  Raises:
    EssentiallyNoPrivacy: ``epsilon(min_noise_multiplier) <= target_epsilon``.
    AccountingTooCostly: 'pld' cannot account this many steps quickly (use 'rdp').
    ValueError: bad arguments, or the extra releases alone spend the target.
  """
  target_epsilon = as_real_scalar('target_epsilon', target_epsilon)
  if not (math.isfinite(target_epsilon) and target_epsilon > 0):
    raise ValueError(f'Expected {target_epsilon=} to be finite and > 0')
  delta = check_delta(delta)
  sampling_prob = _check_sampling_prob(sampling_prob)
  steps = _as_int('steps', steps, minimum=1)
  if accountant not in ACCOUNTANTS:
    raise ValueError(f'Expected accountant in {ACCOUNTANTS}, got {accountant!r}')
  relative_tolerance = as_real_scalar('relative_tolerance', relative_tolerance)
  if not 1e-9 <= relative_tolerance < 1:
    raise ValueError(f'Expected 1e-9 <= {relative_tolerance=} < 1')
  min_noise_multiplier = as_real_scalar('min_noise_multiplier', min_noise_multiplier)
  if not (math.isfinite(min_noise_multiplier) and min_noise_multiplier > 0):
    raise ValueError(f'Expected {min_noise_multiplier=} to be finite and > 0')
  if isinstance(extra_gaussian_noise_multipliers, (str, bytes)) or not isinstance(
      extra_gaussian_noise_multipliers, Sequence | np.ndarray):
    raise ValueError('Expected extra_gaussian_noise_multipliers to be a sequence of numbers, '
                     f'got {extra_gaussian_noise_multipliers!r}')
  extras = [_check_noise_multiplier('extra_gaussian_noise_multipliers[]', z)
            for z in list(extra_gaussian_noise_multipliers)]

  def new_ledger() -> PrivacyLedger:
    ledger = PrivacyLedger(sampling, steps_per_epoch)
    for i, z in enumerate(extras):
      ledger.record_gaussian(z, f'extra_gaussian_{i}')
    return ledger

  if extras:
    extras_epsilon = new_ledger().epsilon(delta, accountant)
    if extras_epsilon >= target_epsilon:
      raise ValueError(
          f'The extra Gaussian releases alone spend epsilon {extras_epsilon:.4g} >= '
          f'{target_epsilon=} at {delta=}: no noise multiplier for the steps can meet it')

  epsilons = {}

  def epsilon_gap(noise_multiplier: float) -> float:
    if noise_multiplier not in epsilons:  # each costs ~0.1 s with PLD
      ledger = new_ledger()
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
          f' multiplier up to 2**30 ({steps=}, {sampling_prob=}'
          f'{", with the extra Gaussian releases" if extras else ""})')
  low = max(high / 2, min_noise_multiplier)
  while epsilon_gap(low) <= 0:  # Ends at the latest at min_noise_multiplier (checked above).
    high, low = low, max(low / 2, min_noise_multiplier)
  try:  # Brent converges in a few steps; bisection below certifies it.
    optimize.brentq(epsilon_gap, low, high,
                    xtol=relative_tolerance * low / 4, maxiter=50)
  except AccountingTooCostly:
    raise
  except (ValueError, RuntimeError):
    pass
  high = min(z for z, eps in epsilons.items() if eps <= target_epsilon)
  low = max(z for z, eps in epsilons.items()
            if eps > target_epsilon and z < high)
  while high - low > relative_tolerance * high:
    middle = (low + high) / 2
    if not low < middle < high:  # Adjacent floats: the bracket cannot shrink further.
      break
    if epsilon_gap(middle) <= 0:
      high = middle
    else:
      low = middle
  return high
