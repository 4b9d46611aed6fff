"""4 devices give the same DP-SGD training as 1 device (fake CPU devices): one noise draw per
logical batch, whatever the mesh."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_four_devices_match_one_device(tiny_data):
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
         'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(REPO)}
  proc = subprocess.run([sys.executable, str(REPO / 'tests' / 'multidevice_check.py'),
                         str(tiny_data['pneumonia'])], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(report) == {'dpsgd'}
  for mech, r in report.items():
    # Same program, reductions split across devices: equal up to float32 summation order.
    assert r['max_param_diff'] <= 1e-5 * max(r['param_scale'], 1.0), (mech, r)
    assert r['max_prob_diff'] <= 1e-4, (mech, r)
    assert all(r['metrics_equal'].values()), (mech, r)
