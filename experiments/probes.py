"""Probes of a demanding user: `python -m experiments.probes` prints one line per probe.

Each probe runs `python -m experiments.run` as a real process on tiny data and checks what a
user would see: damaged checkpoints fall back to the newest intact one, changed flags and
changed data are refused in one line, two runs on one workdir cannot both run, extreme numbers
get one line instead of a traceback or a hang, Ctrl-C exits at once with 130, and a finished
run is reused and says so. Exit status 0 only when every probe passed.

  python -m experiments.probes [--workdir=/tmp/probes]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable

REPO = Path(__file__).resolve().parents[1]
TINY = ['--epochs=3', '--image_size=32', '--batch_size=8', '--microbatch_size=4',
        '--eval_batch_size=16', '--arch=tiny', '--weights=none', '--progress=false',
        '--mech=dpsgd', '--beta=1', '--checkpoint_every_steps=1']
TINY_COUNTS = {'train': [12, 28], 'val': [2, 2], 'test': [6, 10]}
TIMEOUT_S = 300


class Probes:
  """Runs the probes in order, each printing one line; they share a tiny data set and a run."""

  def __init__(self, root: Path):
    self.root = root
    self.env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'JAX_PLATFORMS': 'cpu',
                'DPJAX_CACHE': str(root / 'cache')}
    self.failures = 0

  def cli(self, *args, data: Path | None = None, workdir: Path | None = None,
          timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    argv = [sys.executable, '-m', 'experiments.run', *TINY, *args]
    if data is not None:
      argv.append(f'--data_dir={data}')
    if workdir is not None:
      argv.append(f'--workdir={workdir}')
    return subprocess.run(argv, cwd=REPO, env=self.env, capture_output=True, text=True,
                          timeout=timeout)

  def start(self, *args, data: Path, workdir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, '-m', 'experiments.run', *TINY, *args, f'--data_dir={data}',
         f'--workdir={workdir}'], cwd=REPO, env=self.env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)

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


def _largest_file(folder: Path) -> Path:
  return max((p for p in folder.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


def _garble_meta(step_dir: Path) -> None:
  (step_dir / 'meta' / 'metadata').write_bytes(b'{"ledger": [1, 2')


def _truncate_state(step_dir: Path) -> None:
  data = _largest_file(step_dir / 'state')
  data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])


def _remove_state(step_dir: Path) -> None:
  shutil.rmtree(step_dir / 'state')


def run_probes(root: Path) -> int:
  from experiments import demo_data  # The tiny data, in the real layout.
  probes = Probes(root)
  data = root / 'data'
  demo_data.write_demo_data('pneumonia', data, seed=0, class_counts=TINY_COUNTS)
  killed = root / 'killed'

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

  def concurrent():
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

  probes.probe('two runs, one workdir', concurrent)

  for name, damage in (('garbled meta', _garble_meta), ('truncated state file', _truncate_state),
                       ('missing state/', _remove_state)):
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
      _garble_meta(copy / 'checkpoints' / str(step))
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
  multiprocess_probes(probes, data, root)
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
  # process spends its few seconds importing JAX).
  refusal_pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)
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
  refusal_pool.shutdown()


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
  return subprocess.Popen(
      [sys.executable, '-m', 'experiments.run', *TINY, *args,
       f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={count}',
       f'--process_id={process_id}'], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


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


def multiprocess_probes(probes: Probes, data: Path, root: Path) -> None:
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

  def killed_process_0():
    port, workdir = _free_port(), root / 'killed_0'
    procs = [_job_process(probes, [*args, f'--workdir={workdir}'], port, 2, i) for i in range(2)]
    deadline = time.time() + TIMEOUT_S
    while (not (workdir / 'checkpoints' / '1').is_dir() and procs[1].poll() is None
           and time.time() < deadline):
      time.sleep(0.05)
    procs[0].kill()
    killed = time.time()
    procs[0].communicate()
    return _all_stop([procs[1]], killed, [4])

  # The three that wait out the join timeout run side by side (each on its own port).
  with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
    waiting = [(name, pool.submit(check)) for name, check in (
        ('2 processes: duplicate id 0', duplicate_id), ('2 processes: port taken', port_taken),
        ('2 processes: peer never starts', missing_peer))]
    for name, future in waiting:
      probes.probe(name, future.result)
  probes.probe('2 processes: --num_processes 2 vs 3', count_mismatch)
  probes.probe('2 processes: kill -9 of process 0', killed_process_0)


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
