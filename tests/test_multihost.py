"""Several real processes on localhost, as on a TPU pod or a GPU cluster.

2 processes x 2 CPU devices (jax.distributed, gloo collectives over 127.0.0.1) train exactly
as 1 process x 4 devices, for none, ldp and dpsgd, with one shared data cache and workdir; a
process that dies makes the other stop within seconds with one line, and rerunning both
resumes from the last checkpoint.
"""

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest
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


GLOO_FRAGMENTS = ('[Gloo] Rank ', ' is connected to ',
                  ' peer ranks. Expected number of connected peer ranks is : ')


def _without_gloo_lines(stdout: str) -> str:
  """stdout less gloo's 'Rank r is connected to n peer ranks' lines, however they interleave."""
  for fragment in GLOO_FRAGMENTS:
    stdout = stdout.replace(fragment, ' ')
  return re.sub(r'(?m)^[\d ]*$', '', stdout)


def _params(workdir: Path) -> np.ndarray:
  results = json.loads((workdir / 'results.json').read_text())
  raw = serialization.msgpack_restore((workdir / results['release']['model_file']).read_bytes())
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(raw['params'])])


@pytest.mark.slow
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
  # Only process 0 prints. Gloo's connection lines aside: one per device, written by several
  # threads at once, so they can interleave mid-line; only their fixed text and numbers may remain.
  assert not _without_gloo_lines(outputs[1][0]).strip(), outputs[1][0][-3000:]
  for mech in ('none', 'ldp', 'dpsgd'):
    want, got = _params(tmp_path / 'one' / mech), _params(tmp_path / 'two' / mech)
    # The same program, its reductions split across processes: equal up to float32 order.
    assert np.max(np.abs(want - got)) <= 1e-5 * max(1.0, np.max(np.abs(want))), mech
    a = json.loads((tmp_path / 'one' / mech / 'results.json').read_text())
    b = json.loads((tmp_path / 'two' / mech / 'results.json').read_text())
    assert a['release']['test_metrics'] == b['release']['test_metrics'], mech
    assert a.get('privacy_ledger') == b.get('privacy_ledger') and a['epsilon'] == b['epsilon']
    assert len(b['devices']) == 4 and len(a['devices']) == 4


@pytest.mark.slow
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


def _job(argvs: list[list[str]], cache: Path, timeout_s: float = 300) -> list[tuple[int, str]]:
  """(exit code, stderr) of each process of one job, process i running `argvs[i]`."""
  port = _free_port()
  procs = [subprocess.Popen(
      [*argv, f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={len(argvs)}',
       f'--process_id={i}'], cwd=REPO, env=_env(cache, 2), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i, argv in enumerate(argvs)]
  try:
    outcomes = []
    for proc in procs:
      _, err = proc.communicate(timeout=timeout_s)
      outcomes.append((proc.returncode, err))
    return outcomes
  finally:  # A hang fails the test, and leaves no process behind.
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()


def _error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith('error:')]


def _refused_alike(outcomes: list[tuple[int, str]], workdir: Path, expected: str) -> None:
  """Every process exits 2 with the same one error line, before anything is written."""
  lines = []
  for code, err in outcomes:
    assert code == 2, err[-3000:]
    assert len(_error_lines(err)) == 1, err[-3000:]
    assert 'Traceback' not in err, err[-3000:]
    lines.append(_error_lines(err)[0])
  assert lines[0] == lines[1] and expected in lines[0], lines
  assert not workdir.exists()  # Refused before the workdir was made: nothing trained.


def test_a_process_with_another_clip_norm_stops_every_process(tiny_data, tmp_path):
  workdir = tmp_path / 'run'
  argv = [sys.executable, '-m', 'experiments.run', *FLAGS, '--epochs=1', '--mech=dpsgd',
          f'--data_dir={tiny_data["pneumonia"]}', f'--workdir={workdir}']
  outcomes = _job([[*argv, '--l2_norm_clip=1'], [*argv, '--l2_norm_clip=100']],
                  tmp_path / 'cache')
  _refused_alike(outcomes, workdir, 'error: the processes of this job were started with '
                 'different settings: --l2_norm_clip on process 1 differ from process 0')


def test_a_process_with_one_patient_fewer_stops_every_process(tiny_data, tmp_path):
  from dpjax.data import folders
  fewer = tmp_path / 'fewer'  # Process 1's copy (elsewhere, as on another host) lacks a patient.
  shutil.copytree(tiny_data['pneumonia'], fewer)
  first = sorted((fewer / 'chest_xray' / 'train' / 'PNEUMONIA').glob('*.jpeg'))[0]
  patient = folders.pneumonia_patient_id(first.name)
  for path in fewer.rglob('*.jpeg'):
    if folders.pneumonia_patient_id(path.name) == patient:
      path.unlink()
  workdir = tmp_path / 'run'
  argv = [sys.executable, '-m', 'experiments.run', *FLAGS, '--epochs=1', '--mech=dpsgd',
          f'--workdir={workdir}']
  outcomes = _job([[*argv, f'--data_dir={tiny_data["pneumonia"]}'],
                   [*argv, f'--data_dir={fewer}']], tmp_path / 'cache')
  _refused_alike(outcomes, workdir, 'error: the data differ between the processes of this job: '
                 'process 1 found other files')


# Start-up failures and a dead coordinator: every process ends in bounded time (well under
# the heartbeat) with one line naming the cause, exit 2 (bad flags) or 4 (peer lost or not
# reachable), and no C++ stack dump. The join timeout is shortened to keep them quick; the
# default (parallel.JOIN_TIMEOUT_S = 45 s) bounds them the same way.
JOIN_TIMEOUT_S = 15
DUMP_TEXT = ('Traceback', 'Fatal Python error', 'Check failure', 'terminate called', '*** ',
             '@     0x', 'slow_operation_alarm', 'Failed to add port')


def _start(argv: list[str], port: int, num_processes: int, process_id: int,
           cache: Path) -> subprocess.Popen:
  env = {**_env(cache, 2), 'DPJAX_JOIN_TIMEOUT_S': str(JOIN_TIMEOUT_S)}
  return subprocess.Popen(
      [*argv, f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={num_processes}',
       f'--process_id={process_id}'], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


def _ended(procs: list[subprocess.Popen], within_s: float = 60) -> list[tuple[int, str, float]]:
  """(exit code, stderr, seconds) of each process; a process still running after `within_s`
  fails the test (and is killed)."""
  start, outcomes = time.time(), []
  try:
    for proc in procs:
      _, err = proc.communicate(timeout=max(1.0, within_s - (time.time() - start)))
      outcomes.append((proc.returncode, err, time.time() - start))
    return outcomes
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()


def _one_line(code: int, err: str, want_code: int, *expected: str) -> str:
  assert code == want_code, err[-3000:]
  errors = _error_lines(err)
  assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err[-3000:]
  assert not [text for text in DUMP_TEXT if text in err], err[-3000:]
  for text in expected:
    assert text in errors[0], errors[0]
  return errors[0]


def _quick_argv(workdir: Path) -> list[str]:
  return [sys.executable, '-m', 'experiments.run', *FLAGS, '--epochs=1', '--mech=dpsgd',
          f'--workdir={workdir}']


def test_two_processes_with_process_id_0_both_stop(tmp_path):
  port, argv = _free_port(), _quick_argv(tmp_path / 'run')
  first = _start(argv, port, 2, 0, tmp_path / 'cache')
  time.sleep(3)  # The first owns the port by the time the second checks it.
  second = _start(argv, port, 2, 0, tmp_path / 'cache')
  (code1, err1, _), (code2, err2, _) = _ended([first, second])
  codes = sorted([(code1, err1), (code2, err2)], key=lambda ce: ce[0])
  _one_line(*codes[0], 2, f'port {port} is already in use', '--process_id=0')
  _one_line(*codes[1], 4, 'could not gather 2 processes', f'127.0.0.1:{port}', '--process_id')


def test_a_coordinator_port_in_use_stops_every_process(tmp_path):
  argv = _quick_argv(tmp_path / 'run')
  with socket.socket() as taken:
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    port = taken.getsockname()[1]
    procs = [_start(argv, port, 2, i, tmp_path / 'cache') for i in range(2)]
    (code0, err0, took0), (code1, err1, _) = _ended(procs)
  _one_line(code0, err0, 2, f'--coordinator_address=127.0.0.1:{port}', 'already in use')
  assert took0 < 30  # Refused at once, before waiting for anyone.
  _one_line(code1, err1, 4, 'could not gather 2 processes')


def test_a_missing_process_stops_the_others(tmp_path):
  port = _free_port()
  outcomes = _ended([_start(_quick_argv(tmp_path / 'run'), port, 3, i, tmp_path / 'cache')
                     for i in range(2)])  # Process 2 never starts.
  for code, err, took in outcomes:
    _one_line(code, err, 4, 'could not gather 3 processes', f'127.0.0.1:{port}',
              f'within {JOIN_TIMEOUT_S} s', '--num_processes')
    assert took >= JOIN_TIMEOUT_S
  assert not (tmp_path / 'run').exists()


def test_processes_with_other_process_counts_stop(tmp_path):
  argv, port = _quick_argv(tmp_path / 'run'), _free_port()
  outcomes = _ended([_start(argv, port, 2, 0, tmp_path / 'cache'),
                     _start(argv, port, 3, 1, tmp_path / 'cache')])
  lines = [_one_line(code, err, 2, '--num_processes differs', '2 on process 0', '3 on process 1')
           for code, err, _ in outcomes]
  assert lines[0] == lines[1]
  # The other way round, process 0's coordinator waits for a third process that never comes.
  port = _free_port()
  outcomes = _ended([_start(argv, port, 3, 0, tmp_path / 'cache'),
                     _start(argv, port, 2, 1, tmp_path / 'cache')])
  for code, err, _ in outcomes:
    _one_line(code, err, 4, 'could not gather', '--num_processes')
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_a_killed_process_0_stops_the_others_at_once(tiny_data, tmp_path):
  workdir, port = tmp_path / 'run', _free_port()
  argv = [sys.executable, '-m', 'experiments.run', *FLAGS, '--epochs=6', '--mech=dpsgd',
          '--checkpoint_every_steps=1', f'--data_dir={tiny_data["pneumonia"]}',
          f'--workdir={workdir}']
  procs = [_start(argv, port, 2, i, tmp_path / 'cache') for i in range(2)]
  try:
    deadline = time.time() + TIMEOUT_S
    while not (workdir / 'checkpoints' / '1').is_dir() and time.time() < deadline:
      assert procs[0].poll() is None and procs[1].poll() is None, procs[1].stderr.read()[-2000:]
      time.sleep(0.2)
  finally:
    procs[0].kill()
  procs[0].communicate()
  [(code, err, took)] = _ended([procs[1]], within_s=60)
  _one_line(code, err, 4, 'process 1: another process of this job stopped')
  assert took < 60
