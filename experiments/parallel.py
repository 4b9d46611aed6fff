"""Data parallelism with `jax.sharding`: one code path for one device, many, and many hosts.

A 1-D mesh over all devices: batches are split along their example axis ('data'), parameters
and optimizer state are replicated. The jitted step is the same program as on one device;
XLA inserts the cross-device sums. DP-SGD stays exact: each example is clipped on the device
that holds it, the clipped sum is reduced across devices, and the noise is drawn from a key
that every device holds, so it is identical everywhere and added once per logical batch.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'


def initialize_distributed() -> None:
  """Joins a multi-host job (TPU pod, GPU cluster): JAX reads the topology from the environment."""
  jax.distributed.initialize()


def broadcast_from_first_process(values: list[int]) -> list[int]:
  """Process 0's list of uint32 words on every process (a no-op on one process)."""
  if jax.process_count() == 1:
    return list(values)
  from jax.experimental import multihost_utils  # Deferred: multi-host only.
  words = multihost_utils.broadcast_one_to_all(np.asarray(values, np.uint32))
  return [int(w) for w in np.asarray(words)]


def make_mesh(devices: list | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  return Mesh(np.array(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def num_shards(mesh: Mesh) -> int:
  return mesh.devices.size


def batch_multiple(mesh: Mesh, multiple_of: int = 1) -> int:
  """Batch sizes must split evenly across the devices (and into clipping chunks)."""
  return math.lcm(num_shards(mesh), multiple_of)


def round_up_to_devices(size: int, mesh: Mesh) -> int:
  """The smallest multiple of the device count that is >= size (fixed-shape evaluation)."""
  return math.ceil(size / num_shards(mesh)) * num_shards(mesh)


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))


def local_rows(global_size: int) -> slice:
  """The rows of a global batch that this process loads (all of them on one host)."""
  rows = global_size // jax.process_count()
  return slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)


def shard_batch(local_batch: dict[str, np.ndarray], global_size: int, mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a global batch -> global arrays split along the example axis.

  Every process computes the same global indices (sampling is keyed, not process-local) and
  reads only `local_rows` of them from disk.
  """
  sharding = batch_sharded(mesh)
  if jax.process_count() == 1:
    return jax.device_put(local_batch, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x, (global_size, *x.shape[1:])),
      local_batch)
