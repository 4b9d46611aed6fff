"""Several real processes on localhost, as on a TPU pod or a GPU cluster.

2 processes x 2 CPU devices (jax.distributed, gloo collectives over 127.0.0.1) train exactly
as 1 process x 4 devices, for none, ldp and dpsgd, with one shared data cache and workdir; a
process that dies makes the other stop within seconds with one line, and rerunning both
resumes from the last checkpoint.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import serialization

REPO = Path(__file__).resolve().parents[1]
FLAGS = ['--image_size=32', '--batch_size=8', '--microbatch_size=4', '--eval_batch_size=16',
         '--arch=tiny', '--weights=none', '--progress=false', '--noise_seed=7']
TIMEOUT_S = 600


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(cache: Path, devices: int) -> dict:
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'DPJAX_CACHE': str(cache), 'PYTHONPATH': str(REPO),
          'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
          'PYTHONUNBUFFERED': '1'}


def _pair(argv: list[str], cache: Path) -> list[subprocess.Popen]:
  """Two processes of one job: the README's command pair, --process_id=0 and 1."""
  port = _free_port()
  return [subprocess.Popen(
      [*argv, f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
       f'--process_id={i}'], cwd=REPO, env=_env(cache, 2), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]


def _params(workdir: Path) -> np.ndarray:
  results = json.loads((workdir / 'results.json').read_text())
  raw = serialization.msgpack_restore((workdir / results['release']['model_file']).read_bytes())
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(raw['params'])])


def test_two_processes_train_as_one_process_with_four_devices(tiny_data, tmp_path):
  cache = tmp_path / 'cache'  # One cache: process 0 prepares the data, process 1 waits.
  check = [sys.executable, str(REPO / 'tests' / 'multihost_check.py')]
  flags = [*FLAGS, '--epochs=1', f'--data_dir={tiny_data["pneumonia"]}']
  one = subprocess.run([*check, str(tmp_path / 'one'), *flags], cwd=REPO, env=_env(cache, 4),
                       capture_output=True, text=True, timeout=TIMEOUT_S)
  assert one.returncode == 0, one.stderr[-3000:]
  pair = _pair([*check, str(tmp_path / 'two'), *flags], cache)
  outputs = [p.communicate(timeout=TIMEOUT_S) for p in pair]
  for proc, (_, err) in zip(pair, outputs):
    assert proc.returncode == 0, err[-3000:]
  # Only process 0 prints (gloo's own connection lines aside).
  assert not [line for line in outputs[1][0].splitlines() if not line.startswith('[Gloo]')]
  for mech in ('none', 'ldp', 'dpsgd'):
    want, got = _params(tmp_path / 'one' / mech), _params(tmp_path / 'two' / mech)
    # The same program, its reductions split across processes: equal up to float32 order.
    assert np.max(np.abs(want - got)) <= 1e-5 * max(1.0, np.max(np.abs(want))), mech
    a = json.loads((tmp_path / 'one' / mech / 'results.json').read_text())
    b = json.loads((tmp_path / 'two' / mech / 'results.json').read_text())
    assert a['release']['test_metrics'] == b['release']['test_metrics'], mech
    assert a.get('privacy_ledger') == b.get('privacy_ledger') and a['epsilon'] == b['epsilon']
    assert len(b['devices']) == 4 and len(a['devices']) == 4


def test_a_dead_process_stops_the_other_and_both_resume(tiny_data, tmp_path):
  cache, workdir = tmp_path / 'cache', tmp_path / 'run'
  argv = [sys.executable, '-m', 'experiments.run', *FLAGS, '--epochs=6', '--mech=dpsgd',
          '--checkpoint_every_steps=1', '--heartbeat_timeout_s=10',
          f'--data_dir={tiny_data["pneumonia"]}', f'--workdir={workdir}']
  first, second = _pair(argv, cache)
  deadline = time.time() + TIMEOUT_S
  while not (workdir / 'checkpoints' / '2').is_dir() and time.time() < deadline:
    assert first.poll() is None and second.poll() is None, first.stderr.read()[-2000:]
    time.sleep(0.2)
  second.send_signal(signal.SIGKILL)
  killed = time.time()
  _, err = first.communicate(timeout=120)
  second.communicate()
  assert first.returncode == 4, err[-2000:]
  assert time.time() - killed < 60  # Bounded by the heartbeat: never a hang.
  assert 'another process of this job stopped' in err.strip().splitlines()[-1]
  assert not (workdir / 'results.json').exists()
  # Both again, as the message says: they resume from the last checkpoint and finish.
  again = _pair(argv, cache)
  outputs = [p.communicate(timeout=TIMEOUT_S) for p in again]
  for proc, (_, err) in zip(again, outputs):
    assert proc.returncode == 0, err[-3000:]
  assert 'resumed from step' in outputs[0][1]
  results = json.loads((workdir / 'results.json').read_text())
  assert results['steps'] == sum(run[2] for run in results['privacy_ledger']['runs'])
  # --noise_seed is published, so the released epsilon is inf; the conditional one is as planned.
  assert math.isinf(float(results['epsilon'])) and results['epsilon_if_seed_secret'] <= 1.0 + 1e-6
