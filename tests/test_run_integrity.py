"""Runs that never lie and never lose work: presets that apply, data that cannot change under a
run, one-line refusals; and the probe script that replays a demanding user's list."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import grid
from experiments import run

REPO = Path(__file__).resolve().parents[1]
TINY = ['--epochs=1', '--image_size=32', '--batch_size=8', '--eval_batch_size=16',
        '--arch=tiny', '--progress=false', '--weights=none']


def _grid_cell(protocol: str, data_dir: str, mech: str, beta: float):
  args = grid.build_parser().parse_args([f'--protocol={protocol}', f'--data_dir={data_dir}'])
  (config,) = [c for c in grid.cell_configs(args) if c.mech == mech and c.beta == beta]
  return config


@pytest.mark.parametrize('protocol', ['sound', 'paper'])
@pytest.mark.parametrize('data_dir', ['', '/data/chest_xray'])
def test_a_single_run_gets_the_grid_cells_settings(protocol, data_dir):
  # `--protocol=paper` used to change only the label of a single run.
  flags = [f'--protocol={protocol}', '--mech=dpsgd', '--beta=2'] + (
      [f'--data_dir={data_dir}'] if data_dir else [])
  single = run.make_config(flags).to_dict()
  cell = _grid_cell(protocol, data_dir, 'dpsgd', 2.0).to_dict()
  single.pop('workdir'), cell.pop('workdir')
  assert single == cell
  if protocol == 'paper':
    assert (single['norm'], single['sampling'], single['clip_group_size'], single['delta'],
            single['ldp_variant'], single['privacy_unit']) == (
                'batch_norm', 'shuffled', 4, 1e-4, 'paper_brightness', 'image')
  # Explicit flags still win over the preset.
  assert run.make_config(flags + ['--delta=1e-6', '--norm=group_norm']).delta == 1e-6
  assert run.make_config(flags + ['--norm=group_norm']).norm == 'group_norm'


def test_results_record_the_settings_actually_used(tiny_data, tmp_path, capsys):
  workdir = tmp_path / 'paper'
  code = run.main(['--protocol=paper', '--mech=ldp', f'--data_dir={tiny_data["pneumonia"]}',
                   f'--workdir={workdir}', *TINY])
  assert code == 0, capsys.readouterr().err
  results = json.loads((workdir / 'results.json').read_text())
  assert results['config']['ldp_variant'] == 'paper_brightness'
  assert results['ldp']['variant'] == 'paper_brightness' and results['epsilon'] == 'inf'


def test_changed_data_is_refused_for_a_finished_run(tiny_data, tmp_path, capsys):
  import shutil
  data = tmp_path / 'data'
  shutil.copytree(tiny_data['pneumonia'], data, copy_function=shutil.copy2)
  workdir = tmp_path / 'run'
  argv = ['--mech=none', f'--data_dir={data}', f'--workdir={workdir}', *TINY]
  assert run.main(argv) == 0
  before = (workdir / 'results.json').read_text()
  assert run.main(argv) == 0  # Same data: reused, and it says so.
  assert 'reused the finished run' in capsys.readouterr().out
  normal = sorted((data / 'chest_xray' / 'train' / 'NORMAL').glob('*.jpeg'))
  normal[0].rename(data / 'chest_xray' / 'train' / 'PNEUMONIA' / normal[0].name)
  assert run.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'other data' in err and str(workdir) in err
  assert (workdir / 'results.json').read_text() == before  # Nothing rewritten.


def test_data_errors_name_the_skip_flag(tmp_path, capsys):
  data = tmp_path / 'aptos'
  (data / 'train_images').mkdir(parents=True)
  (data / 'train.csv').write_text('id_code,diagnosis\nabc,2\n')  # Its image is missing.
  assert run.main(['--dataset=aptos', f'--data_dir={data}', f'--workdir={tmp_path / "w"}',
                   *TINY]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.endswith('(pass --skip_bad=true to skip such files)')


def test_probe_script_replays_the_list():
  proc = subprocess.run([sys.executable, '-m', 'experiments.probes'], cwd=REPO,
                        capture_output=True, text=True, timeout=900)
  lines = proc.stdout.strip().splitlines()
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
  assert lines[-1] == 'all probes passed'
  probes = lines[:-1]
  assert len(probes) >= 20 and all(line.startswith('ok ') for line in probes), proc.stdout
