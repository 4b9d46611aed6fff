"""Smoke test of the benchmark command: tiny model, one timed step, every number sane.

The DP-SGD rows are only compiled here (--compile_only), not timed: the DP step itself is
tested in the dpjax tests, and the benchmark builds every step row through the same
`measure_jax_step`.
"""

import json
import math

import pytest

from benchmarks import opacus_step
from benchmarks import run

FAST_ROWS = ('nonprivate', 'ldp_perturb', 'eval', 'input_pipeline', 'opacus')
TINY = ['--arch=tiny', '--image_size=32', '--batch_size=4', '--iters=1', '--warmup=1',
        '--pipeline_images=16']


def _check_measured(row):
  assert row['status'] == 'ok', row.get('note')
  for field in ('images_per_s', 'step_ms_median', 'peak_memory_bytes'):
    assert math.isfinite(row[field]) and row[field] > 0, (row['name'], field, row[field])
  assert row['memory_kind'] in ('process_max_rss', 'device_peak_bytes_in_use')
  # images/s is the batch over the median step time.
  if row['name'] != 'input_pipeline':
    assert row['images_per_s'] == pytest.approx(4 / (row['step_ms_median'] / 1e3))


def test_run_writes_expected_rows(tmp_path, capsys):
  out = tmp_path / 'bench.json'
  run.main([*TINY, f'--rows={",".join(FAST_ROWS)}', '--no-isolate', f'--out={out}'])
  result = json.loads(out.read_text())
  assert [row['name'] for row in result['rows']] == list(FAST_ROWS)
  rows = {row['name']: row for row in result['rows']}
  for name in ('nonprivate', 'ldp_perturb', 'eval', 'input_pipeline'):
    _check_measured(rows[name])
  assert rows['nonprivate']['compile_s'] > 0
  # arch=tiny has no torchvision twin, and torch may be absent: skipped with a note, not failed.
  assert rows['opacus']['status'] == 'skipped' and rows['opacus']['note'].startswith('skipped: ')
  assert result['platform'] in ('cpu', 'gpu', 'tpu')
  assert len(result['load_average']['before']) == 3
  assert result['targets']['dp_vs_nonprivate']['met'] is None  # No DP row measured.
  printed = capsys.readouterr().out
  assert '| nonprivate |' in printed and 'wrote' in printed


def test_compile_only_reports_xla_buffers_and_runs_nothing(tmp_path, capsys):
  out = tmp_path / 'compiled.json'
  run.main([*TINY, '--rows=nonprivate,dpsgd,ldp_perturb', '--no-isolate', '--compile_only',
            f'--out={out}'])
  rows = {row['name']: row for row in json.loads(out.read_text())['rows']}
  for name in ('nonprivate', 'dpsgd'):
    assert rows[name]['status'] == 'compiled' and 'images_per_s' not in rows[name]
    assert rows[name]['xla_buffer_bytes'] >= rows[name]['xla_temp_bytes'] > 0
  assert rows['ldp_perturb']['status'] == 'skipped'
  assert 'compiled only' in capsys.readouterr().out


def test_row_runs_in_its_own_process(tmp_path):
  row = run.measure_row_isolated(run.parse_args(TINY), run.ROWS_BY_NAME['ldp_perturb'],
                                 run.child_argv(run.parse_args(TINY)))
  _check_measured(row)


def test_ratios_and_targets_closed_form():
  rows = {name: {'status': 'ok', 'images_per_s': value}
          for name, value in (('nonprivate', 100.0), ('dpsgd', 40.0), ('opacus', 10.0))}
  ratios, targets = run.ratios_and_targets(rows, 'gpu')
  assert ratios['dpsgd / nonprivate'] == pytest.approx(0.4)
  assert ratios['dpsgd / opacus'] == pytest.approx(4.0)
  assert ratios['dpsgd_microbatch / nonprivate'] is None
  assert targets['dp_vs_nonprivate']['met'] is False
  assert targets['dp_vs_opacus']['met'] is True
  _, cpu_targets = run.ratios_and_targets(rows, 'cpu')
  assert cpu_targets['dp_vs_opacus_cpu']['threshold'] == 1.0


def test_default_microbatch_divides_batch():
  assert [run.default_microbatch_size(b) for b in (1, 4, 16, 18, 128)] == [1, 1, 4, 3, 32]


def test_torch_rows_skip_cleanly_without_torch():
  args = run.parse_args(['--arch=resnet18'])
  reason = run.skip_reason(args, run.ROWS_BY_NAME['opacus'])
  if opacus_step.missing_packages():
    assert 'not installed' in reason
  else:
    assert reason is None


def test_unknown_row_is_rejected():
  with pytest.raises(SystemExit):
    run.parse_args(['--rows=nonprivate,warp_drive'])


def test_compute_dtype_bfloat16_builds_the_bf16_step(tmp_path):
  out = tmp_path / 'bf16.json'
  run.main([*TINY, '--rows=nonprivate', '--no-isolate', '--compile_only',
            '--compute_dtype=bfloat16', f'--out={out}'])
  result = json.loads(out.read_text())
  assert result['config']['compute_dtype'] == 'bfloat16'
  assert result['rows'][0]['status'] == 'compiled', result['rows'][0].get('note')
  # The torch rows are float32 only: skipped with a reason, never timed as if bf16.
  reason = run.skip_reason(run.parse_args(['--compute_dtype=bfloat16']), run.ROWS_BY_NAME['opacus'])
  assert 'not installed' in reason or 'float32 only' in reason


def test_malloc_retain_row_runs_and_is_recorded(tmp_path):
  args = run.parse_args([*TINY, '--malloc=retain'])
  assert '--malloc=retain' in run.child_argv(args)
  row = run.measure_row_isolated(args, run.ROWS_BY_NAME['ldp_perturb'], run.child_argv(args))
  _check_measured(row)
