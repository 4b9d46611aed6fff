"""A run killed with SIGKILL resumes from its checkpoint and ends exactly as an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def test_a_killed_run_resumes_with_a_smaller_microbatch(tiny_data, tmp_path, monkeypatch, capsys):
  # The natural fix after running out of memory. The same examples, per-example clipping and
  # noise draws; only the order of the chunk sums changes, so the result agrees to float rounding.
  import numpy as np
  from experiments import checkpoint
  from experiments import run
  args = [a for a in ARGS if not a.startswith(('--microbatch_size', '--epochs'))] + ['--epochs=2']
  data = tiny_data['pneumonia']
  reference, killed = tmp_path / 'reference', tmp_path / 'killed'
  assert run.main([f'--data_dir={data}', f'--workdir={reference}', *args,
                   '--microbatch_size=8']) == 0
  real_save, saves = checkpoint.RunCheckpointer.save, []

  def save_then_die(self, step, *rest):
    real_save(self, step, *rest)
    saves.append(step)
    if len(saves) == 3:
      raise KeyboardInterrupt  # Out of memory, say.

  monkeypatch.setattr(checkpoint.RunCheckpointer, 'save', save_then_die)
  assert run.main([f'--data_dir={data}', f'--workdir={killed}', *args, '--microbatch_size=8']) == 130
  monkeypatch.undo()
  capsys.readouterr()
  assert run.main([f'--data_dir={data}', f'--workdir={killed}', *args, '--microbatch_size=2']) == 0
  err = capsys.readouterr().err
  assert 'resumed from step 3' in err and '--microbatch_size: 8 -> 2' in err, err
  assert 'float rounding' in err
  want = json.loads((reference / 'results.json').read_text())
  got = json.loads((killed / 'results.json').read_text())
  assert got['privacy_ledger'] == want['privacy_ledger'] and got['epsilon'] == want['epsilon']
  np.testing.assert_allclose(got['release']['val_metrics']['loss'],
                             want['release']['val_metrics']['loss'], rtol=1e-4)
  assert [e['val_loss'] for e in got['release']['history']] == pytest.approx(
      [e['val_loss'] for e in want['release']['history']], rel=1e-4)
