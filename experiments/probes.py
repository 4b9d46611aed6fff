"""Probes of a demanding user: `python -m experiments.probes` prints one line per probe.

Each probe runs `python -m experiments.run` as a real process on tiny data and checks what a
user would see: damaged checkpoints fall back to the newest intact one, changed flags and
changed data are refused in one line, two runs on one workdir cannot both run, extreme numbers
get one line instead of a traceback or a hang, Ctrl-C exits at once with 130, and a finished
run is reused and says so. Issue 24's list besides: full disks (a small tmpfs: root only, else
skipped), a trickling weight download, two grids on one folder, a deleted demo cache, and
several processes of one job on localhost. Exit status 0 only when every probe passed.

  python -m experiments.probes [--workdir=/tmp/probes]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from collections.abc import Callable

REPO = Path(__file__).resolve().parents[1]
TINY = ['--epochs=3', '--image_size=32', '--batch_size=8', '--microbatch_size=4',
        '--eval_batch_size=16', '--arch=tiny', '--weights=none', '--progress=false',
        '--mech=dpsgd', '--beta=1', '--checkpoint_every_steps=1']
TINY_COUNTS = {'train': [12, 28], 'val': [2, 2], 'test': [6, 10]}
TIMEOUT_S = 900  # A guard against hangs only: a loaded machine (niced probes, xdist) is slow, not wrong.
# The grid's tiny cells (as tests/test_grid.py's TINY_SET).
TINY_GRID = ['--dataset=pneumonia', '--set', 'epochs=1', '--set', 'image_size=32', '--set',
             'batch_size=8', '--set', 'eval_batch_size=16', '--set', 'arch=tiny', '--set',
             'progress=false', '--set', 'weights=none', '--set', 'microbatch_size=8']
EXIT_RESUMABLE = 4  # experiments.checkpoint.EXIT_DISK_FULL, and a lost peer: rerun to resume.
NO_TMPFS = 'skipped (cannot mount tmpfs)'  # Not root, or no mount in this container: ok.


class Probes:
  """Runs the probes in order, each printing one line; they share a tiny data set and a run."""

  def __init__(self, root: Path, nice: int = 0):
    self.root = root
    self.env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'JAX_PLATFORMS': 'cpu',
                'DPJAX_CACHE': str(root / 'cache')}
    self.failures = 0
    # Processes of probes that compute beside probes that time how long others take to stop
    # run at a lower priority, so that they do not slow those others down.
    self.prefix = ['nice', '-n', str(nice)] if nice and shutil.which('nice') else []

  def niced(self) -> Probes:
    """The same probes (environment, root), whose processes run at a lower CPU priority."""
    other = Probes(self.root, nice=10)
    other.env = self.env
    return other

  def python(self, module: str, *args) -> list[str]:
    return [*self.prefix, sys.executable, '-m', module, *args]

  def popen(self, argv: list[str], env: dict[str, str] | None = None,
            stdout=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=REPO, env=env or self.env, stdout=stdout,
                            stderr=subprocess.PIPE, text=True)

  def cli(self, *args, data: Path | None = None, workdir: Path | None = None,
          timeout: float = TIMEOUT_S, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess:
    argv = self.python('experiments.run', *TINY, *args)
    if data is not None:
      argv.append(f'--data_dir={data}')
    if workdir is not None:
      argv.append(f'--workdir={workdir}')
    return subprocess.run(argv, cwd=REPO, env=env or self.env, capture_output=True, text=True,
                          timeout=timeout)

  def grid(self, *args, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(self.python('experiments.grid', *args), cwd=REPO, env=self.env,
                          capture_output=True, text=True, timeout=timeout)

  def start(self, *args, data: Path, workdir: Path) -> subprocess.Popen:
    return self.popen(self.python('experiments.run', *TINY, *args, f'--data_dir={data}',
                                  f'--workdir={workdir}'))

  def probe(self, name: str, check: Callable[[], str]) -> None:
    start = time.time()
    try:
      detail = check()
      status = 'ok  '
    except Exception as e:  # pylint: disable=broad-except  (a failed probe is reported, not raised)
      detail, status = f'{type(e).__name__}: {e}'.splitlines()[0][:300], 'FAIL'
      self.failures += 1
    print(f'{status} {name:<34} {time.time() - start:5.1f}s  {detail}', flush=True)


def _one_line_refusal(proc: subprocess.CompletedProcess, *must_contain: str, code: int = 2) -> str:
  lines = proc.stderr.strip().splitlines()
  if proc.returncode != code:
    raise AssertionError(f'exit {proc.returncode}, wanted {code}: {proc.stderr.strip()[-300:]}')
  if len(lines) != 1 or 'Traceback' in proc.stderr:
    raise AssertionError(f'{len(lines)} lines of stderr: {proc.stderr.strip()[-300:]}')
  for text in must_contain:
    if text not in lines[0]:
      raise AssertionError(f'{text!r} not in {lines[0]!r}')
  return lines[0]


def _checkpoint_steps(workdir: Path) -> list[int]:
  folder = workdir / 'checkpoints'
  return sorted(int(p.name) for p in folder.glob('*') if p.name.isdigit()) if folder.is_dir() else []


def largest_file(folder: Path) -> Path:
  return max((p for p in folder.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


def garble_meta(step_dir: Path) -> None:
  (step_dir / 'meta' / 'metadata').write_bytes(b'{"ledger": [1, 2')


def truncate_state(step_dir: Path) -> None:
  data = largest_file(step_dir / 'state')
  data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])


def remove_state(step_dir: Path) -> None:
  shutil.rmtree(step_dir / 'state')


def run_probes(root: Path) -> int:
  from experiments import demo_data  # The tiny data, in the real layout.
  probes = Probes(root)
  data = root / 'data'
  demo_data.write_demo_data('pneumonia', data, seed=0, class_counts=TINY_COUNTS)
  killed = root / 'killed'
  # Probes that depend on no other (their own workdirs and caches, and their own copy of the
  # data, which the probes below change) run one at a time in the background from the start,
  # below the normal CPU priority: on the core the probes below mostly leave idle. They print
  # at the end.
  quiet_data = root / 'quiet_data'
  demo_data.write_demo_data('pneumonia', quiet_data, seed=0, class_counts=TINY_COUNTS)
  background = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  independent = [(name, background.submit(check, probes.niced(), quiet_data, root))
                 for name, check in INDEPENDENT_PROBES]

  def bad(*args, contains=(), code=2):
    return lambda: _one_line_refusal(probes.cli(*args, data=data, workdir=root / 'bad'),
                                     *contains, code=code)

  probes.probe('epsilon 1e6: no hang', bad('--epsilon=1e6', contains=('essentially no privacy',)))
  probes.probe('epsilon 1e4: answered at once', bad('--epsilon=1e4', contains=('--epsilon=10000',)))
  probes.probe('shuffled + microbatch 5', bad('--sampling=shuffled', '--microbatch_size=5',
                                              contains=('--microbatch_size',)))
  (root / 'a_file').write_text('x')
  probes.probe('workdir is a file', lambda: _one_line_refusal(
      probes.cli(data=data, workdir=root / 'a_file'), '--workdir', 'is a file'))
  probes.probe('workdir cannot be created', lambda: _one_line_refusal(
      probes.cli(data=data, workdir=root / 'a_file' / 'sub'), '--workdir', 'cannot be created'))
  probes.probe('cache_dir unusable', bad(f'--cache_dir={root / "a_file"}',
                                         contains=('--cache_dir',)))
  probes.probe('clip groups under Poisson', bad('--clip_group_size=4',
                                                contains=('--clip_group_size',)))

  def ctrl_c():
    proc = probes.start(data=data, workdir=killed)
    deadline = time.time() + TIMEOUT_S
    while len(_checkpoint_steps(killed)) < 2 and proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    sent = time.time()
    _, err = proc.communicate(timeout=60)
    waited = time.time() - sent
    if proc.returncode != 130 or 'interrupted' not in err or waited > 5:
      raise AssertionError(f'exit {proc.returncode} after {waited:.1f}s: {err.strip()[-200:]}')
    return f'exit 130 after {waited:.2f}s at checkpoint {max(_checkpoint_steps(killed))}'

  probes.probe('Ctrl-C while training', ctrl_c)
  probes.probe('learning rate 1e6 diverges', bad('--learning_rate=1e6', '--mech=none',
                                                 contains=('diverged', '--learning_rate'), code=3))

  def ctrl_c_compiling():
    proc = probes.start(data=data, workdir=root / 'compiling')
    time.sleep(6)  # Past the imports, inside data preparation or XLA compilation.
    proc.send_signal(signal.SIGINT)
    sent = time.time()
    _, err = proc.communicate(timeout=60)
    waited = time.time() - sent
    if proc.returncode != 130 or waited > 5:
      raise AssertionError(f'exit {proc.returncode} after {waited:.1f}s: {err.strip()[-200:]}')
    return f'exit 130 after {waited:.2f}s'

  probes.probe('Ctrl-C while compiling', ctrl_c_compiling)

  probes.probe('changed --momentum', lambda: _one_line_refusal(
      probes.cli('--momentum=0.9', data=data, workdir=killed), '--momentum: 0.0 -> 0.9'))
  probes.probe('changed --mech', lambda: _one_line_refusal(
      probes.cli('--mech=ldp', data=data, workdir=killed), '--mech'))

  def two_runs_one_workdir():
    first = probes.start(data=data, workdir=root / 'busy')
    deadline = time.time() + TIMEOUT_S
    while not (root / 'busy').is_dir() and first.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    started = time.time()
    second = probes.cli(data=data, workdir=root / 'busy')
    line = _one_line_refusal(second, 'in use')
    took = time.time() - started
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=60)
    if first.returncode != 143:
      raise AssertionError(f'the first run exited {first.returncode} on SIGTERM, wanted 143')
    return f'second refused in {took:.1f}s; first stopped by SIGTERM with 143; {line}'

  probes.probe('two runs, one workdir', two_runs_one_workdir)

  for name, damage in (('garbled meta', garble_meta), ('truncated state file', truncate_state),
                       ('missing state/', remove_state)):
    def fallback(damage=damage, name=name):
      copy = root / f'damaged_{name.split()[0]}'
      shutil.copytree(killed, copy, symlinks=True)
      latest = max(_checkpoint_steps(copy))
      damage(copy / 'checkpoints' / str(latest))
      proc = probes.cli(data=data, workdir=copy)
      if proc.returncode != 0:
        raise AssertionError(f'exit {proc.returncode}: {proc.stderr.strip()[-300:]}')
      if 'damaged' not in proc.stderr or 'resumed from step' not in proc.stderr:
        raise AssertionError(f'no fallback said: {proc.stderr.strip()[-300:]}')
      results = json.loads((copy / 'results.json').read_text())
      steps = sum(run[2] for run in results['privacy_ledger']['runs'])
      if steps != results['steps'] or results['epsilon'] > 1.0 + 1e-6:
        raise AssertionError(f'ledger {steps} steps vs {results["steps"]}, eps {results["epsilon"]}')
      return f'step {latest} skipped, finished at eps {results["epsilon"]:.3f} over {steps} steps'
    probes.probe(f'damaged checkpoint: {name}', fallback)

  def none_intact():
    copy = root / 'all_damaged'
    shutil.copytree(killed, copy, symlinks=True)
    for step in _checkpoint_steps(copy):
      garble_meta(copy / 'checkpoints' / str(step))
    return _one_line_refusal(probes.cli(data=data, workdir=copy), 'no intact checkpoint',
                             str(copy / 'checkpoints'))

  probes.probe('no intact checkpoint', none_intact)

  finished = root / 'damaged_garbled'  # Finished by the fallback probe above.

  def reused():
    proc = probes.cli(data=data, workdir=finished)
    if proc.returncode != 0 or 'reused' not in proc.stdout:
      raise AssertionError(f'exit {proc.returncode}: {proc.stdout.strip()[-200:]}')
    mode = (finished / 'results.json').stat().st_mode & 0o777
    if mode != 0o600:  # The curator's record (not_covered): theirs alone.
      raise AssertionError(f'results.json mode {mode:o}')
    return f'said it was reused; results.json mode {mode:o}'

  probes.probe('finished run is reused', reused)

  # The data change under both the killed run and the finished one.
  normal = sorted((data / 'chest_xray' / 'train' / 'NORMAL').glob('*.jpeg'))
  for path in normal[:4]:
    path.rename(data / 'chest_xray' / 'train' / 'PNEUMONIA' / path.name)
  probes.probe('changed data, killed run', lambda: _one_line_refusal(
      probes.cli(data=data, workdir=killed), 'other data'))
  probes.probe('changed data, finished run', lambda: _one_line_refusal(
      probes.cli(data=data, workdir=finished), 'other data'))

  # Issue 24: a release model given as --weights, and a symlink loop in the data folder.
  # Its own workdir: `bad`'s may hold an earlier probe's run, refused for other settings first.
  probes.probe('--weights=<release/model.msgpack>', lambda: _one_line_refusal(
      probes.cli(f'--weights={finished / "release" / "model.msgpack"}', '--mech=none',
                 data=data, workdir=root / 'weights_release'),
      'is a dpjax release', 'torchvision'))
  looping = root / 'looping_data'
  shutil.copytree(data, looping, symlinks=True)
  link = looping / 'chest_xray' / 'train' / 'NORMAL' / 'loop.jpeg'
  os.symlink(link.name, link)
  probes.probe('symlink loop in the data', lambda: _one_line_refusal(
      probes.cli(data=looping, workdir=root / 'looping'), str(link), 'symbolic link loop'))
  lifecycle_probes(probes, data, root, finished, normal[:4], bad)
  multiprocess_probes(probes, data, root,
                      more_timed=(('download trickles: deadline', download_deadline),))
  for name, future in independent:
    probes.probe(name, future.result)
  background.shutdown()
  return probes.failures


def lifecycle_probes(probes: Probes, data: Path, root: Path, finished: Path, moved: list[Path],
                     bad) -> None:
  """Issue 24, the run lifecycle: data restored byte for byte, flags that change no result, a
  tampered release, and run lengths whose memory would grow without bound."""
  for path in moved:  # The data back as they were: the same bytes, at new times.
    (data / 'chest_xray' / 'train' / 'PNEUMONIA' / path.name).rename(path)
    path.write_bytes(path.read_bytes())

  def restored():
    proc = probes.cli('--progress=true', '--eval_batch_size=8', '--checkpoint_every_steps=2',
                      data=data, workdir=finished)
    if proc.returncode != 0 or 'reused' not in proc.stdout or '--eval_batch_size' not in proc.stderr:
      raise AssertionError(f'exit {proc.returncode}: {proc.stderr.strip()[-300:]}')
    return 'reused, and said --eval_batch_size changes at most float rounding'

  probes.probe('restored data + neutral flags', restored)

  def tampered():
    copy = root / 'tampered'
    shutil.copytree(finished, copy, symlinks=True)
    model = copy / 'release' / 'model.msgpack'
    model.write_bytes(model.read_bytes()[:64])
    return _one_line_refusal(probes.cli(data=data, workdir=copy), 'model.msgpack changed')

  probes.probe('truncated release not reused', tampered)
  for mech in ('--mech=none', '--mech=ldp', '--accountant=rdp'):
    probes.probe(f'--epochs=1000000 {mech}', bad('--epochs=1000000', mech,
                                                  contains=('--epochs=1000000', 'at most')))
  # Issue 24: flags that ended in a traceback, ran to the end, or blamed the learning rate;
  # each is refused in one line before the data are prepared (started side by side: each
  # process spends its few seconds importing JAX). The one that trains starts first, and
  # prints last.
  refusal_pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)
  training = [('killed run, smaller --microbatch_size',
               refusal_pool.submit(smaller_microbatch, probes, data, root))]
  no_release_json = root / 'no_release_json'
  shutil.copytree(finished, no_release_json, symlinks=True)
  (no_release_json / 'release' / 'release.json').unlink()
  lone_refusals = [
      ('release.json deleted: not reused', refusal_pool.submit(
          probes.cli, data=data, workdir=no_release_json), ('release.json missing',)),
      ('grid --epsilons=inf dpsgd_b0', refusal_pool.submit(
          probes.grid, '--epsilons=inf', '--cells=dpsgd_b0', f'--workdir={root / "grid_inf"}'),
       ('--epsilons', 'inf'))]
  flag_refusals = {}
  for flags, named in (
      (('--seed=1180591620717411303424',), '--seed'), (('--epsilon=nan',), '--epsilon'),
      (('--delta=1e-300',), '--delta'), (('--l2_norm_clip=nan',), '--l2_norm_clip'),
      (('--audit=true', '--audit_canaries=0'), '--audit_canaries'),
      (('--audit=true', '--audit_canaries=-5'), '--audit_canaries'),
      (('--learning_rate=-1',), '--learning_rate'), (('--learning_rate=nan',), '--learning_rate'),
      (('--momentum=nan',), '--momentum'), (('--weight_decay=nan',), '--weight_decay'),
      (('--l2_norm_clip=inf',), '--l2_norm_clip'),
      (('--noise_multiplier=1e300',), 'noise std')):
    flag_refusals[flags] = (named, refusal_pool.submit(
        probes.cli, *flags, data=data, workdir=root / 'bad_flags'))
  for flags, (named, future) in flag_refusals.items():
    probes.probe(' '.join(flags), lambda f=future, n=named: _one_line_refusal(f.result(), n))
  for name, future, named in lone_refusals:
    probes.probe(name, lambda f=future, n=named: _one_line_refusal(f.result(), *n))
  for name, future in training:
    probes.probe(name, future.result)
  refusal_pool.shutdown()


def smaller_microbatch(probes: Probes, data: Path, root: Path) -> str:
  """The killed run (Ctrl-C probe) resumed with a smaller --microbatch_size, as after running
  out of memory: the same examples, clipping and noise, so it goes on and finishes."""
  copy = root / 'killed_microbatch'
  shutil.copytree(root / 'killed', copy, symlinks=True)
  latest = max(_checkpoint_steps(copy))
  proc = probes.cli('--microbatch_size=2', data=data, workdir=copy)
  if (proc.returncode != 0 or 'resumed from step' not in proc.stderr
      or '--microbatch_size: 4 -> 2' not in proc.stderr):
    raise AssertionError(f'exit {proc.returncode}: {proc.stderr.strip()[-300:]}')
  said = next(x for x in proc.stderr.splitlines() if 'resumed from step' in x)
  return f'{said.split(" (")[0]} (checkpoint {latest}) with --microbatch_size 4 -> 2, exit 0'


def tiny_epsilon(probes: Probes, data: Path, root: Path) -> str:
  """--epsilon=1e-12: refused in one line, or run with the accountant's epsilon printed as
  computed (a huge noise multiplier gives (0, delta)-DP exactly, not a rounded 1e-12)."""
  proc = probes.cli('--epsilon=1e-12', '--epochs=1', data=data, workdir=root / 'tiny_epsilon')
  if proc.returncode == 2:
    return _one_line_refusal(proc, '--epsilon')
  if proc.returncode != 0 or 'Traceback' in proc.stderr:
    raise AssertionError(f'exit {proc.returncode}: {proc.stderr.strip()[-300:]}')
  results = json.loads((root / 'tiny_epsilon' / 'results.json').read_text())
  eps, delta = results['epsilon'], results['delta']
  printed = f'({eps:.3g}, {delta:g})-DP'
  if not 0 <= eps <= 1e-12 or printed not in proc.stdout:
    raise AssertionError(f'epsilon {eps!r}, {printed!r} not printed: {proc.stdout[-300:]}')
  return (f'ran at z={results["noise_multiplier"]:.4g}, printed {printed} = the accountant\'s '
          f'epsilon {eps!r}')


# Several processes of one job on localhost (issue 24): every start-up failure and a killed
# process 0 end every process within MULTIPROCESS_LIMIT_S (well under the heartbeat), each
# with one line, exit 2 (bad flags) or 4 (a peer lost or not reachable), and no stack dump.
MULTIPROCESS_LIMIT_S = 60
MULTIPROCESS_JOIN_TIMEOUT_S = 20
DUMP_TEXT = ('Traceback', 'Fatal Python error', 'Check failure', 'terminate called', '*** ',
             '@     0x', 'slow_operation_alarm', 'Failed to add port')


def _free_port() -> int:
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _job_process(probes: Probes, args: list[str], port: int, count: int,
                 process_id: int) -> subprocess.Popen:
  # The join timeout shortened from 45 s: the probes of a peer that never comes wait it out.
  env = {**probes.env, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
         'DPJAX_JOIN_TIMEOUT_S': str(MULTIPROCESS_JOIN_TIMEOUT_S)}
  return probes.popen(probes.python(
      'experiments.run', *TINY, *args, f'--coordinator_address=127.0.0.1:{port}',
      f'--num_processes={count}', f'--process_id={process_id}'), env=env)


def _all_stop(procs: list[subprocess.Popen], since: float, wanted: list[int]) -> str:
  """Every process ends within MULTIPROCESS_LIMIT_S of `since` with its wanted code and one
  error line; returns what they said, with the time each took."""
  said = []
  try:
    for i, (proc, code) in enumerate(zip(procs, wanted)):
      _, err = proc.communicate(timeout=max(1.0, MULTIPROCESS_LIMIT_S - (time.time() - since)))
      took = time.time() - since
      errors = [line for line in err.splitlines() if line.startswith('error:')]
      dumps = [text for text in DUMP_TEXT if text in err]
      if proc.returncode != code or len(errors) != 1 or dumps:
        raise AssertionError(f'process {i}: exit {proc.returncode} (wanted {code}), '
                             f'{len(errors)} error lines, {dumps}: {err.strip()[-300:]}')
      said.append(f'p{i} exit {code} {took:.0f}s: {errors[0][7:90]}')
  except subprocess.TimeoutExpired:
    raise AssertionError(f'still running {MULTIPROCESS_LIMIT_S}s after the failure') from None
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  return ' | '.join(said)


def multiprocess_probes(probes: Probes, data: Path, root: Path, more_timed=()) -> None:
  """The multi-process probes, side by side with `more_timed`: other independent probes that
  time how soon a process stops, (name, check(probes, data, root)) each."""
  args = [f'--data_dir={data}', '--epochs=6']

  def duplicate_id():
    port, start = _free_port(), time.time()
    first = _job_process(probes, [*args, f'--workdir={root / "dup"}'], port, 2, 0)
    time.sleep(3)
    second = _job_process(probes, [*args, f'--workdir={root / "dup"}'], port, 2, 0)
    return _all_stop([second, first], start, [2, 4])

  def port_taken():
    import socket  # pylint: disable=import-outside-toplevel
    with socket.socket() as taken:
      taken.bind(('127.0.0.1', 0))
      taken.listen()
      port, start = taken.getsockname()[1], time.time()
      return _all_stop([_job_process(probes, [*args, f'--workdir={root / "taken"}'], port, 2, i)
                        for i in range(2)], start, [2, 4])

  def missing_peer():
    port, start = _free_port(), time.time()
    return _all_stop([_job_process(probes, [*args, f'--workdir={root / "missing"}'], port, 2, 0)],
                     start, [4])

  def count_mismatch():
    port, start = _free_port(), time.time()
    return _all_stop([_job_process(probes, [*args, f'--workdir={root / "count"}'], port, n, i)
                      for i, n in enumerate((2, 3))], start, [2, 2])

  def killed_process(victim: int):
    port, workdir = _free_port(), root / f'killed_{victim}'
    # A 20 s heartbeat: a survivor busy compiling (not in a collective) learns of the death
    # from the coordination service within it, well inside MULTIPROCESS_LIMIT_S even on a
    # loaded machine (with the default 60 s it took 53 s once under load).
    procs = [_job_process(probes, [*args, f'--workdir={workdir}', '--heartbeat_timeout_s=20'],
                          port, 2, i) for i in range(2)]
    survivor = procs[1 - victim]
    deadline = time.time() + TIMEOUT_S
    while (not (workdir / 'checkpoints' / '1').is_dir() and survivor.poll() is None
           and time.time() < deadline):
      time.sleep(0.05)
    procs[victim].kill()
    killed = time.time()
    procs[victim].communicate()
    return _all_stop([survivor], killed, [EXIT_RESUMABLE])

  # All side by side. Those timed from their start (the join timeout, each on its own port)
  # start first; those timed from a kill or a deadline once those have imported JAX.
  begin = time.time() + 12

  def later(check):
    def delayed():
      time.sleep(max(0.0, begin - time.time()))
      return check()
    return delayed

  checks = [('2 processes: duplicate id 0', duplicate_id), ('2 processes: port taken', port_taken),
            ('2 processes: peer never starts', missing_peer),
            ('2 processes: --num_processes 2 vs 3', later(count_mismatch)),
            ('2 processes: kill -9 of process 0', later(lambda: killed_process(0))),
            ('2 processes: kill -9 of process 1', later(lambda: killed_process(1))),
            *[(name, later(lambda c=check: c(probes, data, root))) for name, check in more_timed]]
  with concurrent.futures.ThreadPoolExecutor(max_workers=len(checks)) as pool:
    futures = [(name, pool.submit(check)) for name, check in checks]
    for name, future in futures:
      probes.probe(name, future.result)


# Issue 24, the rest of the list: full disks, a trickling download, two grids on one folder, a
# demo cache deleted under a killed run. Each is independent of the others (its own workdir and
# cache) and mostly waits, so they run side by side with the multi-process probes.


@contextlib.contextmanager
def _small_tmpfs(path: Path, size: str):
  """A tmpfs of `size` mounted at `path` (root only), unmounted afterwards; None where none
  can be mounted (not root, or a container without the right): the probe is then skipped."""
  path.mkdir(parents=True, exist_ok=True)
  try:
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                             capture_output=True, timeout=30).returncode == 0
  except (OSError, subprocess.SubprocessError):
    mounted = False
  try:
    yield path if mounted else None
  finally:
    if mounted and subprocess.run(['umount', str(path)], capture_output=True,
                                  timeout=30).returncode != 0:
      subprocess.run(['umount', '-l', str(path)], capture_output=True, timeout=30)


def _resumes(proc: subprocess.Popen, step: int | None = None) -> str:
  """'resumed from step N' once `proc` (a run with stderr piped) says so; then stopped by
  SIGTERM: what follows is the same training the Ctrl-C probe's run finishes."""
  said = ''
  try:
    for said in proc.stderr:
      if 'resumed from step' in said or said.startswith(('error', 'Traceback')):
        break
  finally:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
  if f'resumed from step {"" if step is None else f"{step} "}' not in said:
    raise AssertionError(f'not resumed (from step {step}): {(said + err).strip()[-300:]}')
  return said.strip().split(' (')[0]


def full_disk_checkpoint(probes: Probes, data: Path, root: Path) -> str:
  """The workdir's disk fills while a checkpoint is written: exit 4, one line naming the
  folder, no half-written checkpoint; with room again, the same command resumes from the last
  complete one (stopped by SIGTERM once it says so: the rest is the Ctrl-C probe's run)."""
  with _small_tmpfs(root / 'full_disk', '320k') as small:
    if small is None:
      return NO_TMPFS
    workdir = small / 'run'
    line = _one_line_refusal(probes.cli(data=data, workdir=workdir), 'no space left',
                             str(workdir), 'while writing checkpoint', code=EXIT_RESUMABLE)
    half = sorted(p.name for p in workdir.rglob('*orbax-checkpoint-tmp*'))
    if half:
      raise AssertionError(f'half-written checkpoint(s) left: {half}')
    freed = root / 'full_disk_freed'  # The folder as the full disk left it, where there is room.
    shutil.copytree(workdir, freed, symlinks=True)
  kept = _checkpoint_steps(freed)
  if not kept:
    return f'no half-written checkpoint, none complete to resume from; {line}'
  said = _resumes(probes.start(data=data, workdir=freed), max(kept))
  return f'no half-written checkpoint; with room again {said}; {line}'


def full_disk_cache(probes: Probes, data: Path, root: Path) -> str:
  """--cache_dir fills while TFDS prepares the data: exit 4, one line naming the folder."""
  with _small_tmpfs(root / 'full_cache', '48k') as small:
    if small is None:
      return NO_TMPFS
    line = _one_line_refusal(
        probes.cli(f'--cache_dir={small}', data=data, workdir=root / 'full_cache_run'),
        'no space left', str(small), 'preparing the data', code=EXIT_RESUMABLE)
    half = sorted(str(p.relative_to(small)) for p in small.rglob('*incomplete*'))
    if half:
      raise AssertionError(f'half-prepared data left: {half}')
    return line


@contextlib.contextmanager
def _trickling_server(size: int = 4 << 20):
  """An HTTP server on 127.0.0.1 sending `size` bytes, 1 KiB every 20 ms (never silent for
  long, never done in time); yields its URL and {'asked': time of the first request, 'gone':
  time the client closed the connection}."""
  times, stop = {}, threading.Event()

  class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # pylint: disable=arguments-differ
      pass

    def do_GET(self):  # pylint: disable=invalid-name
      times.setdefault('asked', time.time())
      self.send_response(200)
      self.send_header('Content-Length', str(size))
      self.end_headers()
      try:
        for _ in range(0, size, 1024):
          if stop.wait(0.02):
            return
          self.wfile.write(b'\0' * 1024)
          self.wfile.flush()
      except (BrokenPipeError, ConnectionResetError):
        times.setdefault('gone', time.time())  # The client gave up.

  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
  server.daemon_threads = True
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f'http://127.0.0.1:{server.server_address[1]}/models/resnet18.pth', times
  finally:
    stop.set()
    server.shutdown()
    server.server_close()
    thread.join(10)


def download_deadline(probes: Probes, data: Path, root: Path) -> str:
  """A weight download that trickles is stopped at $DPJAX_DOWNLOAD_DEADLINE_S, in one line
  (exit 2: a --data_dir run never trains without the weights it asked for), keeping a .part
  that the next attempt continues from."""
  deadline_s, cache = 3, root / 'download_cache'
  env = {k: v for k, v in probes.env.items() if k.lower() not in (
      'http_proxy', 'https_proxy', 'all_proxy')}
  env.update(DPJAX_DOWNLOAD_DEADLINE_S=str(deadline_s), no_proxy='*', NO_PROXY='*',
             DPJAX_WEIGHTS_DIR=str(root / 'no_weights_dir'), TORCH_HOME=str(root / 'no_torch'))
  with _trickling_server() as (url, times):
    env['DPJAX_WEIGHTS_URL'] = url
    proc = probes.cli('--weights=imagenet', '--arch=resnet18', '--mech=none',
                      f'--cache_dir={cache}', data=data, workdir=root / 'download', env=env)
    ended = time.time()
    time.sleep(0.1)  # The server's last write, after the process ended.
  line = _one_line_refusal(proc, 'deadline', 'DPJAX_DOWNLOAD_DEADLINE_S')
  if 'asked' not in times:
    raise AssertionError('the server got no request')
  stopped = times.get('gone', ended) - times['asked']  # When the client hung up.
  parts = [p for p in (cache / 'weights').glob('*.part') if p.stat().st_size]
  if stopped > deadline_s + 3 or not parts:
    raise AssertionError(f'stopped {stopped:.1f}s after asking (deadline {deadline_s}s), '
                         f'.part kept: {[p.name for p in parts]}')
  return (f'stopped {stopped:.1f}s after asking (deadline {deadline_s}s), exit 2 after '
          f'{ended - times["asked"]:.1f}s, {parts[0].stat().st_size} bytes kept in '
          f'{parts[0].name}; {line[:110]}')


def two_grids(probes: Probes, data: Path, root: Path) -> str:
  """A second grid on the folder of a running one is refused in one line; the first finishes
  with its row in table.md."""
  workdir = root / 'grid'
  lock = workdir / 'sound' / 'grid.lock'  # experiments.grid.GRID_LOCK_FILE
  args = [*TINY_GRID, f'--data_dir={data}', f'--workdir={workdir}']
  first = probes.popen(probes.python('experiments.grid', *args, '--cells=original'))
  try:
    deadline = time.time() + TIMEOUT_S
    while first.poll() is None and time.time() < deadline and not (
        lock.is_file() and lock.read_text().startswith('pid')):
      time.sleep(0.05)
    line = _one_line_refusal(probes.grid(*args, '--cells=ldp_b1'), str(workdir / 'sound'),
                             'another grid', f'pid {first.pid}')
    _, err = first.communicate(timeout=TIMEOUT_S)
  finally:
    if first.poll() is None:
      first.kill()
      first.communicate()
  if first.returncode != 0:
    raise AssertionError(f'the first grid exited {first.returncode}: {err.strip()[-300:]}')
  rows = [r.split('|')[1].strip() for r in (workdir / 'sound' / 'table.md').read_text()
          .splitlines() if r.startswith('| ') and not r.startswith('| cell')]
  if 'original' not in rows or 'ldp_b1' in rows:
    raise AssertionError(f'table.md rows: {rows}')
  return f'the first finished with its row; {line}'


def demo_cache_deleted(probes: Probes, data: Path, root: Path) -> str:  # pylint: disable=unused-argument
  """A killed run on the demo data resumes after the demo data were deleted and regenerated
  (byte-identical files at new times: the fingerprint is by content)."""
  cache, workdir = root / 'demo_cache', root / 'demo_run'
  env = {**probes.env, 'DPJAX_CACHE': str(cache)}
  # Fewer, larger steps than TINY's on the 800 demo training images.
  argv = probes.python('experiments.run', *TINY, '--epochs=1', '--batch_size=64',
                       '--microbatch_size=64', '--eval_batch_size=64', f'--workdir={workdir}')
  first = probes.popen(argv, env=env, stdout=subprocess.DEVNULL)
  deadline = time.time() + TIMEOUT_S
  while len(_checkpoint_steps(workdir)) < 2 and first.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  first.kill()
  _, err = first.communicate()
  steps = _checkpoint_steps(workdir)
  if not steps:
    raise AssertionError(f'no checkpoint before the kill (exit {first.returncode}): '
                         f'{err.strip()[-300:]}')
  shutil.rmtree(cache / 'demo')
  said = _resumes(probes.popen(argv, env=env, stdout=subprocess.DEVNULL))
  return f'killed at checkpoint {max(steps)}, demo data deleted and made again: {said}'


# Run in the background (run_probes), the longest first.
INDEPENDENT_PROBES = (('demo data deleted, killed run', demo_cache_deleted),
                      ('disk full: checkpoint', full_disk_checkpoint),
                      ('two grids, one folder', two_grids),
                      ('--epsilon=1e-12', tiny_epsilon),
                      ('disk full: TFDS cache', full_disk_cache))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='', help='where to put the probes\' runs (default: a '
                      'temporary folder, deleted afterwards)')
  args = parser.parse_args(argv)
  root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix='dpjax_probes_'))
  root.mkdir(parents=True, exist_ok=True)
  try:
    failures = run_probes(root)
  finally:
    if not args.workdir:
      shutil.rmtree(root, ignore_errors=True)
  print(f'{failures} probe(s) failed' if failures else 'all probes passed')
  return 1 if failures else 0


if __name__ == '__main__':
  sys.exit(main())
