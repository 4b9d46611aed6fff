"""Run checkpoints with orbax: training state, best-by-validation model and the privacy ledger.

The ledger is saved in the SAME orbax checkpoint as the state it describes, and orbax
finalises a checkpoint by an atomic rename, so after a crash (even `kill -9`) the latest
checkpoint holds a state and exactly the DP steps that produced it: a resumed run neither
counts a step twice nor loses one.

Checkpoints are PRIVATE artifacts: they hold the run's secret key (the `secret` item, and the
noise key inside the optimizer state), without which an exact resume is impossible, and
statistics of training data. The folder is created readable by its owner only; publish the
model exported beside results.json, never the checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

_ITEMS = ('state', 'best', 'meta', 'secret')


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _unwrap_keys(tree):
  """Typed PRNG keys -> their raw uint32 data, which orbax stores like any array."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _rewrap_keys(template, tree):
  return jax.tree.map(
      lambda t, x: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x,
      template, tree)


class RunCheckpointer:
  """Latest-state checkpoints of one run under `<workdir>/checkpoints/<step>`.

  Each checkpoint holds four items: `state` (the TrainState), `best` (the model selected on
  validation so far), `meta` (JSON: ledger, history, partial-epoch sums, selection) and
  `secret` (JSON: the run's private key words and where they came from).
  """

  def __init__(self, workdir: str | Path, max_to_keep: int = 2):
    self.directory = Path(workdir).resolve() / 'checkpoints'
    if not self.directory.exists():
      self.directory.mkdir(parents=True, mode=0o700)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, best, meta: dict[str, Any], secret: dict[str, Any]) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_unwrap_keys(state)),
        best=ocp.args.StandardSave(_unwrap_keys(best)),
        meta=ocp.args.JsonSave(meta),
        secret=ocp.args.JsonSave(secret)))
    self._manager.wait_until_finished()

  def restore_secret(self, step: int) -> dict[str, Any]:
    """The `secret` item of checkpoint `step` alone (needed before the run can be built)."""
    return self._manager.restore(step, args=ocp.args.Composite(
        secret=ocp.args.JsonRestore()))['secret']

  def restore(self, step: int, state_template, best_template):
    """Returns (state, best, meta) of checkpoint `step`, shaped like the templates."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_unwrap_keys(state_template)),
        best=ocp.args.StandardRestore(_unwrap_keys(best_template)),
        meta=ocp.args.JsonRestore()))
    return (_rewrap_keys(state_template, restored['state']),
            _rewrap_keys(best_template, restored['best']), restored['meta'])

  def close(self) -> None:
    self._manager.close()
