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
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'


EXIT_PEER_FAILED = 4
# How long the processes of a job wait for each other to join (every process started within
# this time of the first); past it every process stops with one line. DPJAX_JOIN_TIMEOUT_S
# overrides it (a cluster whose processes start minutes apart).
JOIN_TIMEOUT_S = 45
WAITING_NOTICE_S = 30  # While joining: one line every this many seconds.


def join_timeout_s() -> int:
  try:
    return max(1, int(os.environ.get('DPJAX_JOIN_TIMEOUT_S', JOIN_TIMEOUT_S)))
  except ValueError:
    return JOIN_TIMEOUT_S


_STOPPING = threading.Lock()


def _stop(code: int, line: str) -> None:
  """Ends this process at once with one line on stderr: before JAX's C++ runtime aborts it
  with a stack dump, and without JAX's shutdown barrier (which would wait for the others).
  Of several threads stopping at once (a failed collective, the coordination service's
  error), the first one's line is the one printed."""
  _STOPPING.acquire()  # Never released: the process ends here.
  sys.stderr.write(line + '\n')
  sys.stderr.flush()
  sys.stdout.flush()
  os._exit(code)


def _check_port_free(address: str) -> None:
  """Process 0 refuses a coordinator port that something on this host already listens on
  (another job, or another process started with --process_id=0): gRPC would otherwise share
  or fail the port and every process would wait for minutes before a stack dump."""
  from experiments.config_checks import ConfigError  # Deferred: no cycle at import.
  port = int(address.rpartition(':')[2])
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no user.
    try:
      s.bind(('', port))
    except OSError as e:
      raise ConfigError(f'--coordinator_address={address}: port {port} is already in use on '
                        f'this host ({e.strerror}): another job holds it, or another process '
                        'was started with --process_id=0; give every process of this job one '
                        'free port') from None


class _Notice:
  """While the processes join: `waiting for ...` on stderr every WAITING_NOTICE_S seconds."""

  def __init__(self, text: str):
    self.text, self.done = text, threading.Event()
    self.thread = threading.Thread(target=self._run, daemon=True, name='dpjax-join-notice')

  def _run(self) -> None:
    start = time.monotonic()
    while not self.done.wait(WAITING_NOTICE_S):
      sys.stderr.write(f'{self.text} ({time.monotonic() - start:.0f} s)...\n')
      sys.stderr.flush()

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.done.set()


class _ClientWithCallback:
  """`jaxlib._jax` with `get_distributed_runtime_client` given a missed-heartbeat callback:
  JAX's own (C++) reaction to a lost coordinator or peer is an abort with a stack dump."""

  def __init__(self, lib, callback):
    self._lib, self._callback = lib, callback

  def __getattr__(self, name):
    return getattr(self._lib, name)

  def get_distributed_runtime_client(self, *args, **kwargs):
    kwargs.setdefault('missed_heartbeat_callback', self._callback)
    return self._lib.get_distributed_runtime_client(*args, **kwargs)


def _peer_lost_line(process_id: int, reason: str) -> str:
  return (f'error: process {process_id}: another process of this job stopped or cannot be '
          f'reached ({reason}); rerun every process with the same flags to resume from the last '
          'checkpoint')


def _peer_lost_callback(process_id: int):
  def callback(*status):
    reason = ' '.join(str(s) for s in status).splitlines()[0][:300] if status else 'no heartbeat'
    _stop(EXIT_PEER_FAILED, _peer_lost_line(process_id, reason))
  return callback


_KEPT = []  # The C callbacks handed to libstdc++ live as long as the process.


def _exit_on_runtime_termination(process_id: int) -> None:
  """A lost coordinator (process 0 killed) makes JAX's coordination client fail in one of its
  C++ threads, which ends the process through `std::terminate` (jaxlib 0.10 cannot hand the
  error to a Python callback): an abort with C++ output and exit -6. This replaces the
  terminate handler of libstdc++ with one line and exit 4. Linux with a shared libstdc++ only;
  elsewhere JAX's own reaction stays."""
  import ctypes  # pylint: disable=import-outside-toplevel
  try:
    set_terminate = ctypes.CDLL('libstdc++.so.6')._ZSt13set_terminatePFvvE
  except (OSError, AttributeError):
    return
  handler = ctypes.CFUNCTYPE(None)(lambda: _stop(EXIT_PEER_FAILED, _peer_lost_line(
      process_id, 'the coordination service of this job failed')))
  set_terminate.argtypes, set_terminate.restype = [ctypes.c_void_p], ctypes.c_void_p
  set_terminate(ctypes.cast(handler, ctypes.c_void_p))
  _KEPT.append(handler)


def initialize_distributed(coordinator_address: str = '', num_processes: int = 0,
                           process_id: int = -1, heartbeat_timeout_s: int = 60) -> None:
  """Joins a job of several processes, once per process (later calls do nothing).

  Without a coordinator address JAX detects the cluster (Cloud TPU, SLURM, Open MPI, ...);
  with one, the processes meet there (`HOST:PORT` of process 0). The CPU backend's
  collectives go over gloo, so the same command runs several processes on one machine.

  Every failure ends every process in bounded time with one line, never a hang or a stack
  dump: a coordinator port in use (process 0: exit 2), processes that do not all join within
  `join_timeout_s()` (a missing process, a wrong --num_processes or --process_id: exit 4), a
  --num_processes that differs between processes (exit 2), and, once running, a process that
  dies or stops sending heartbeats for `heartbeat_timeout_s` (the others: exit 4).
  """
  if jax.distributed.is_initialized():
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # Only the CPU backend reads it.
  timeout = join_timeout_s()
  explicit = {}
  if coordinator_address:
    explicit = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                    process_id=process_id)
    if process_id == 0:
      _check_port_free(coordinator_address)
  where = coordinator_address or 'the detected coordinator'
  try:
    from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
    lib = jax_distributed._jax  # pylint: disable=protected-access
  except (ImportError, AttributeError):  # Another JAX: its own reaction to a lost peer.
    jax_distributed, lib = None, None
  if lib is not None:
    _exit_on_runtime_termination(max(process_id, 0))
    jax_distributed._jax = _ClientWithCallback(  # pylint: disable=protected-access
        lib, _peer_lost_callback(max(process_id, 0)))
  others = f'the other {num_processes - 1}' if num_processes > 1 else 'the other'
  try:
    with _Notice(f'waiting for {others} process(es) of this job at {where}'):
      jax.distributed.initialize(**explicit, initialization_timeout=timeout,
                                 heartbeat_timeout_seconds=int(heartbeat_timeout_s))
  except Exception as e:  # pylint: disable=broad-except  (C++ errors of every kind)
    reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    reason = 'timed out' if 'bad_cast' in reason else reason  # Jaxlib's callback of a timeout.
    count = f'{num_processes} processes' if num_processes else 'the processes of this job'
    _stop(EXIT_PEER_FAILED,
          f'error: process {max(process_id, 0)}: could not gather {count} at {where} within '
          f'{timeout} s ({reason}): check that every process runs, with the same '
          '--coordinator_address and --num_processes and its own --process_id, and that this '
          'host reaches process 0')
  finally:
    if lib is not None:
      jax_distributed._jax = lib  # pylint: disable=protected-access
  _check_same_process_count(num_processes, timeout)


def _check_same_process_count(num_processes: int, timeout_s: int) -> None:
  """Refuses (ConfigError, exit 2) a process whose --num_processes differs from process 0's.

  Only process 0's count makes the job (its coordinator waits for that many): a process
  started with a larger count would otherwise run as part of a smaller job, unnoticed.
  """
  if not num_processes:
    return
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
  from experiments.config_checks import ConfigError
  client = jax_distributed.global_state.client
  me, size = jax.process_index(), jax.process_count()
  client.key_value_set(f'dpjax/num_processes/{me}', str(num_processes))
  counts = {p: int(client.blocking_key_value_get(f'dpjax/num_processes/{p}', timeout_s * 1000))
            for p in range(size)}
  differing = [p for p in range(size) if counts[p] != counts[0]]
  if differing:
    said = ', '.join(f'{counts[p]} on process {p}' for p in differing)
    raise ConfigError(f'--num_processes differs between the processes of this job: {counts[0]} '
                      f'on process 0 (whose coordinator gathered {size}), {said}; start every '
                      'process with the same --num_processes')




def exit_if_a_peer_failed(error: Exception) -> None:
  """In a job of several processes, a collective that fails because another process died
  ends this one at once with one line (and exit 4), instead of a traceback followed by an
  abort in JAX's shutdown barrier. Other errors return."""
  if not jax.distributed.is_initialized() or jax.process_count() == 1:
    return
  reason = (str(error).splitlines() or [type(error).__name__])[0][:300]
  if not (isinstance(error, jax.errors.JaxRuntimeError) or 'Gloo' in reason):  # Gloo: ValueError.
    return
  _stop(EXIT_PEER_FAILED, _peer_lost_line(jax.process_index(), reason))


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


def gather_from_all_processes(values: list[int]) -> list[list[int]]:
  """Every process's list of uint32 words, in process order, on every process (one process:
  its own). The lists must have the same length on every process."""
  if jax.process_count() == 1:
    return [list(values)]
  from jax.experimental import multihost_utils  # Deferred: multi-host only.
  rows = multihost_utils.process_allgather(np.asarray(values, np.uint32))
  return [[int(w) for w in row] for row in np.asarray(rows).reshape(jax.process_count(), -1)]


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
