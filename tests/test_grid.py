"""The experiment grid end to end on tiny settings, both protocols, and its reports."""

import csv
import json

import pytest

from experiments import grid
from experiments import report

TINY_SET = ['--set', 'epochs=1', '--set', 'image_size=32', '--set', 'batch_size=8',
            '--set', 'eval_batch_size=16', '--set', 'arch=tiny', '--set', 'progress=false',
            '--set', 'weights=none', '--set', 'microbatch_size=8']


@pytest.mark.parametrize('protocol', ['sound', 'paper'])
def test_tiny_grid_writes_tables_and_figures(tiny_data, tmp_path, protocol, capsys):
  workdir = tmp_path / 'grid'
  argv = ['--dataset=pneumonia', f'--protocol={protocol}', f'--data_dir={tiny_data["pneumonia"]}',
          f'--workdir={workdir}', '--cells=original,ldp_b1,dpsgd_b1', '--set', 'audit=true',
          *TINY_SET]
  assert grid.main(argv) == 0, capsys.readouterr().err
  out = workdir / protocol
  table = (out / 'table.md').read_text()
  for cell in ('original', 'ldp_b1', 'dpsgd_b1'):
    assert f'| {cell} |' in table
  assert 'Majority-class test accuracy: 62.50%' in table  # 10 of the 16 tiny test images.
  assert '| None |' not in table  # The non-private row's unit is '-' (issue 25).
  assert 'MIA AUC' in table
  rows = list(csv.DictReader(open(out / 'table.csv')))
  assert all(0 <= float(r['mia_auc_not_covered']) <= 1 for r in rows)
  assert [r['cell'] for r in rows] == ['original', 'ldp_b1', 'dpsgd_b1']
  published = {r['cell']: r['published_test'] for r in rows}
  assert published == {'original': '90.22', 'ldp_b1': '91.03', 'dpsgd_b1': '79.81'}
  for name in ('learning_curves.png', 'privacy_utility.png'):
    assert (out / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert (out / 'release' / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert table.startswith(report.CURATOR_TABLE_NOTE)
  # The publishable table: no column computed from training examples outside the mechanism.
  public = (out / 'release' / 'table.md').read_text()
  assert public.startswith(report.PUBLISHABLE_TABLE_NOTE) and '| dpsgd_b1 |' in public
  for word in ('not covered', 'MIA', 'train acc', 'paper train', 'wall'):
    assert word not in public, word
  public_rows = list(csv.DictReader(open(out / 'release' / 'table.csv')))
  assert [r['cell'] for r in public_rows] == ['original', 'ldp_b1', 'dpsgd_b1']
  for column in public_rows[0]:
    assert not column.endswith(report.NOT_COVERED_SUFFIX) and 'train' not in column, column
  assert {'val_mean', 'test_mean', 'epsilon', 'epsilon_replace_one', 'delta'} <= set(public_rows[0])
  dpsgd = json.loads((out / 'pneumonia' / 'paper' / 'dpsgd_b1_seed0' / 'results.json').read_text())
  ldp = json.loads((out / 'pneumonia' / 'paper' / 'ldp_b1_seed0' / 'results.json').read_text())
  if protocol == 'sound':
    assert dpsgd['epsilon'] <= 1.0 + 1e-6 and dpsgd['neighbouring_relation'] == 'add_or_remove_one'
    assert 'no image-level' not in table
    # The count of training units is published: the replace-one epsilon is printed beside.
    assert dpsgd['epsilon_replace_one'] > dpsgd['epsilon']
    assert f"{dpsgd['epsilon_replace_one']:.3g} replace-one" in public
  else:
    # BatchNorm in train mode: no guarantee at all, and the table says so.
    assert dpsgd['epsilon'] == 'inf' and dpsgd['clip_group_size'] == 4
    assert dpsgd['epsilon_claimed_by_paper_method'] <= 1.0 + 1e-6
    assert 'none (BatchNorm in train mode)' in table
    assert ldp['epsilon'] == 'inf' and ldp['ldp']['variant'] == 'paper_brightness'
    assert 'no image-level DP' in table
    assert dpsgd['config']['sampling'] == 'shuffled' and dpsgd['delta'] == 1e-4

  # Re-running the grid reuses the finished cells instead of recomputing them.
  before = {p: p.stat().st_mtime_ns for p in out.rglob('results.json')}
  assert grid.main(argv) == 0
  assert {p: p.stat().st_mtime_ns for p in out.rglob('results.json')} == before


def test_recipes_side_by_side_at_the_same_epsilons(tiny_data, tmp_path, capsys):
  # The modern recipe beside the paper's, at target epsilons of our choosing.
  workdir = tmp_path / 'grid'
  argv = ['--dataset=pneumonia', f'--data_dir={tiny_data["pneumonia"]}', f'--workdir={workdir}',
          '--recipes=paper,modern', '--epsilons=2', '--cells=original,dpsgd_b0.5', *TINY_SET,
          '--set', 'microbatch_size=4']
  assert grid.main(argv) == 0, capsys.readouterr().err
  out = workdir / 'sound'
  rows = list(csv.DictReader(open(out / 'table.csv')))
  assert [(r['recipe'], r['cell']) for r in rows] == [
      ('modern', 'original'), ('modern', 'dpsgd_b0.5'), ('paper', 'original'),
      ('paper', 'dpsgd_b0.5')]
  modern = json.loads((out / 'pneumonia' / 'modern' / 'dpsgd_b0.5_seed0' / 'results.json').read_text())
  assert modern['config']['augmult'] == 4 and modern['config']['averaging'] == 'ema'
  assert modern['target_epsilon'] == 2.0 and modern['epsilon'] <= 2.0 + 1e-6
  table = (out / 'table.md').read_text()
  assert 'Recipes at the same epsilon' in table
  line = next(x for x in table.splitlines() if x.startswith('| dpsgd_b0.5 | 2 |'))
  assert line.count('|') == 2 + 1 + 6  # cell, epsilon, and 3 metrics x 2 recipes.


def test_bad_grid_flags_exit_2(capsys):
  # epsilon inf would be beta 0, which a `beta or 1.0` once ran as epsilon 1 under the name b0.
  for epsilons in ('inf', '1,inf', 'nan', '0', '-1'):
    assert grid.main([f'--epsilons={epsilons}', '--cells=dpsgd_b0', '--workdir=/nonexistent']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and '--epsilons' in err, err
  assert grid.main(['--dataset=mnist']) == 2
  assert grid.main(['--protocol=fast']) == 2
  assert grid.main(['--set', 'no_such_field=1']) == 2
  assert len(capsys.readouterr().err.strip().splitlines()) == 3


@pytest.mark.parametrize('setting, named', [
    ('noise_multiplier=0.0001', '--noise_multiplier'),  # Below the floor: no privacy.
    ('arch=resnet50', '--arch'),
    ('norm=batch_norm', '--norm'),  # Refused for the DP-SGD cells: checked before any cell runs.
])
def test_every_cell_is_checked_before_any_runs(tmp_path, capsys, setting, named):
  workdir = tmp_path / 'grid'
  assert grid.main(['--dataset=pneumonia', f'--workdir={workdir}', '--set', setting]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and named in err, err
  assert not workdir.exists()


def test_archs_run_every_cell_with_their_presets(tmp_path):
  args = grid.build_parser().parse_args(
      ['--dataset=pneumonia', f'--workdir={tmp_path}', '--archs=resnet8,scatternet',
       '--epsilons=1', '--cells=original,dpsgd_b1', '--seeds=0,1', '--set', 'weights=none'])
  configs = grid.cell_configs(args)
  assert len(configs) == 2 * 2 * 2
  by_arch = {}
  for config in configs:
    by_arch.setdefault(config.arch, []).append(config)
  assert set(by_arch) == {'resnet8', 'scatternet'}
  assert all(not c.augment for c in by_arch['scatternet'])
  # The DP-SGD preset's large batch; the non-private cell takes more, smaller steps.
  assert {c.mech: c.batch_size for c in by_arch['scatternet']} == {'dpsgd': 256, 'none': 64}
  assert all(c.batch_size == 64 for c in by_arch['resnet8'])
  assert all(f'/paper/{c.arch}/' in c.workdir for c in configs)
  with pytest.raises(ValueError, match='--archs'):
    grid.cell_configs(grid.build_parser().parse_args(['--archs=vgg']))


def test_a_second_grid_on_one_folder_is_refused_and_a_dead_holders_lock_taken_over(
    tiny_data, tmp_path, capsys):
  # Two grids on one folder both exited 0, and table.md held only the later one's cells.
  import os
  import signal
  import subprocess
  import sys
  from experiments.workdir import FolderLock
  workdir = tmp_path / 'grid'
  folder = workdir / 'sound'
  argv = ['--dataset=pneumonia', f'--data_dir={tiny_data["pneumonia"]}', f'--workdir={workdir}',
          '--cells=original', *TINY_SET]
  holder = FolderLock(folder, grid.GRID_LOCK_FILE, 'another grid')
  holder.acquire()  # Another grid running there (flock is per open file: held in this process).
  try:
    assert grid.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(folder) in err and f'pid {os.getpid()}' in err, err
    assert not (folder / 'table.md').exists()
  finally:
    holder.release()
  # A holder killed by SIGKILL leaves its file but not its lock: the next grid takes it over.
  code = ('import sys, time; from experiments.workdir import FolderLock; '
          f'FolderLock(sys.argv[1], {grid.GRID_LOCK_FILE!r}, "g").acquire(); print("held", '
          'flush=True); time.sleep(60)')
  proc = subprocess.Popen([sys.executable, '-c', code, str(folder)], stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == 'held'
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  proc.stdout.close()
  assert f'pid {proc.pid}' in (folder / grid.GRID_LOCK_FILE).read_text()
  assert grid.main(argv) == 0, capsys.readouterr().err
  assert 'original' in (folder / 'table.md').read_text()


def test_a_cell_made_under_another_selection_rule_is_refused_naming_the_grids_workdir(
    tiny_data, tmp_path, capsys):
  # A grid rerun after --selection=auto changed meaning: the one line names the folder the
  # user gave (the grid's --workdir) and the cell, not a cell folder as if it were a --workdir.
  workdir = tmp_path / 'grid'
  argv = ['--dataset=pneumonia', f'--data_dir={tiny_data["pneumonia"]}', f'--workdir={workdir}',
          '--cells=original', *TINY_SET]
  assert grid.main(argv) == 0, capsys.readouterr().err
  (path,) = (workdir / 'sound').rglob('results.json')
  results = json.loads(path.read_text())
  results['release']['selection_rule'] = 'val_auc'
  path.write_text(json.dumps(results))
  capsys.readouterr()
  assert grid.main(argv) == 2
  err = capsys.readouterr().err
  cell = path.parent.relative_to(workdir)
  assert err == (f'error: --workdir={workdir}: its cell {cell} selected its model by val_auc '
                 '(what its --selection meant then), this grid by val_balanced_accuracy; use a '
                 'new --workdir\n'), err
