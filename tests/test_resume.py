"""A run killed with SIGKILL resumes from its checkpoint and ends exactly as an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARGS = ['--mech=dpsgd', '--beta=1', '--epochs=3', '--image_size=32', '--batch_size=8',
        '--microbatch_size=8', '--eval_batch_size=16', '--arch=tiny', '--weights=none',
        '--progress=false', '--checkpoint_every_steps=1', '--augment=true',
        '--noise_seed=1']  # Reproducible noise, so that two runs can be compared exactly.


def _cmd(data_dir, workdir):
  return [sys.executable, '-m', 'experiments.run', f'--data_dir={data_dir}', f'--workdir={workdir}',
          *ARGS]


def _latest_checkpoint(workdir: Path) -> int:
  steps = [int(p.name) for p in (workdir / 'checkpoints').glob('*') if p.name.isdigit()]
  return max(steps, default=-1)


def test_sigkill_then_resume_equals_uninterrupted_run(tiny_data, tmp_path):
  env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
  data = tiny_data['pneumonia']
  reference = tmp_path / 'reference'
  subprocess.run(_cmd(data, reference), cwd=REPO, env=env, check=True, capture_output=True)

  killed = tmp_path / 'killed'
  proc = subprocess.Popen(_cmd(data, killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while _latest_checkpoint(killed) < 4 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, 'the run finished before it could be killed'
  assert not (killed / 'results.json').exists()
  interrupted_at = _latest_checkpoint(killed)
  assert interrupted_at >= 4

  resumed = subprocess.run(_cmd(data, killed), cwd=REPO, env=env, capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr
  assert 'resumed from step' in resumed.stderr + resumed.stdout

  want = json.loads((reference / 'results.json').read_text())
  got = json.loads((killed / 'results.json').read_text())
  # No DP step counted twice or lost: the ledgers are identical.
  assert got['privacy_ledger'] == want['privacy_ledger']
  assert got['steps'] == want['steps'] == sum(run[2] for run in want['privacy_ledger']['runs'])
  assert got['epsilon'] == want['epsilon']
  got['release'].pop('model_file'), want['release'].pop('model_file')
  assert got['release'] == want['release']
  assert got['not_covered'] == want['not_covered']
