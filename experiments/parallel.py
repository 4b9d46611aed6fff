"""Data parallelism with `jax.sharding`: one code path for one device, many, and many hosts.

A 1-D mesh over all devices: batches are split along their example axis ('data'), parameters
and optimizer state are replicated. The jitted step is the same program as on one device;
XLA inserts the cross-device sums. DP-SGD stays exact: each example is clipped on the device
that holds it, the clipped sum is reduced across devices, and the noise is drawn from a key
that every device holds, so it is identical everywhere and added once per logical batch.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'


def initialize_distributed(coordinator_address: str = '', num_processes: int = 0,
                           process_id: int = -1, heartbeat_timeout_s: int = 60) -> None:
  """Joins a job of several processes, once per process (later calls do nothing).

  Without a coordinator address JAX detects the cluster (Cloud TPU, SLURM, Open MPI, ...);
  with one, the processes meet there (`HOST:PORT` of process 0). The CPU backend's
  collectives go over gloo, so the same command runs several processes on one machine. A
  process that stops sending heartbeats for `heartbeat_timeout_s` makes the others fail with
  an error instead of waiting forever in a collective.
  """
  if jax.distributed.is_initialized():
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # Only the CPU backend reads it.
  explicit = {}
  if coordinator_address:
    explicit = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                    process_id=process_id)
  jax.distributed.initialize(**explicit, heartbeat_timeout_seconds=int(heartbeat_timeout_s))


EXIT_PEER_FAILED = 4


def exit_if_a_peer_failed(error: Exception) -> None:
  """In a job of several processes, a collective that fails because another process died
  ends this one at once with one line (and exit 4), instead of a traceback followed by an
  abort in JAX's shutdown barrier. Other errors return."""
  if jax.process_count() == 1 or not isinstance(error, jax.errors.JaxRuntimeError):
    return
  reason = str(error).splitlines()[0][:300]
  sys.stderr.write(f'error: process {jax.process_index()}: another process of this job stopped '
                   f'({reason}); rerun every process with the same flags to resume from the '
                   'last checkpoint\n')
  sys.stderr.flush()
  sys.stdout.flush()
  os._exit(EXIT_PEER_FAILED)


def barrier(name: str) -> None:
  """Waits until every process got here (a no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # Deferred: multi-host only.
    multihost_utils.sync_global_devices(name)


def first_process_first(name: str, fn: Callable[[], Any]) -> Any:
  """`fn()` on process 0, then, once it is done, on the others.

  For work that leaves files behind (demo data, the prepared dataset): with a shared
  filesystem the others find it done; without one they redo it locally, never two at once
  on one copy.
  """
  if jax.process_index() == 0:
    result = fn()
    barrier(f'{name}: done on process 0')
    return result
  barrier(f'{name}: done on process 0')
  return fn()


def is_first_process() -> bool:
  """Whether this process writes results, logs and progress (process 0 of a job)."""
  return jax.process_index() == 0


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
  """The same host values on every device of `mesh` as global arrays.

  Several processes: each process builds its addressable shards from its own copy (all hold
  the same values), never `device_put` to another process's devices. Typed PRNG keys travel
  as their raw words and are wrapped again on the devices.
  """
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def global_leaf(leaf):
    is_key = jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    host = np.asarray(jax.random.key_data(leaf) if is_key else leaf)
    array = jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    if is_key:
      impl = jax.random.key_impl(leaf)
      array = jax.jit(lambda data: jax.random.wrap_key_data(data, impl=impl),
                      out_shardings=sharding)(array)
    return array

  return jax.tree.map(global_leaf, tree)


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
