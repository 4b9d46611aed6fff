"""The paper's experiment grid: `python -m experiments.grid --dataset=pneumonia`.

Runs original (no privacy), LDP beta=1,2,4 and DP-SGD beta=1,2,4 (or `--epsilons`) for one or
both datasets, several seeds (init and augmentation; one train/validation split for all,
`--set split_seed=N`) and recipes (`--recipes=paper,modern`), under the sound protocol
(default) or the paper's, then writes `table.md`, `table.csv` and figures under `--workdir`. A finished cell is reused, an interrupted one
resumes from its checkpoint. Without `--data_dir` it uses the demo data and the demo preset.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

from experiments import cli
from experiments import report
from experiments.cli import EXIT_BAD_INPUT
from experiments.cli import EXIT_DIVERGED
from experiments.cli import FlagError
from experiments.cli import OneLineParser
from experiments.cli import exit_promptly_on_signals
from experiments.cli import failure_exit_code
from experiments.configs import default as default_config

# Config fields the grid sets per cell from its own flags: `--set` cannot change them.
GRID_FIELDS = {'dataset': '--dataset', 'protocol': '--protocol', 'recipe': '--recipes',
               'mech': '--cells',
               'beta': '--cells', 'seed': '--seeds', 'workdir': '--workdir',
               'data_dir': '--data_dir (or --pneumonia_dir / --aptos_dir)'}


GRID_LOCK_FILE = 'grid.lock'  # In <--workdir>/<protocol>: names the grid running there.


def build_parser() -> argparse.ArgumentParser:
  parser = OneLineParser(prog='python -m experiments.grid', description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  choices = cli.field_choices()  # As experiments.run --help lists them (read, not imported).
  parser.add_argument('--dataset', default='pneumonia', help='one of '
                      f'{", ".join((*choices.get("dataset", ()), "both"))} (default: pneumonia)')
  parser.add_argument('--protocol', default='sound', help='as experiments.run --protocol: one of '
                      f'{", ".join(choices.get("protocol", ()))} (default: sound)')
  parser.add_argument('--seeds', default='0', help='comma-separated seeds, e.g. 0,1,2: model init '
                      'and augmentation only; every cell holds out the same units (--set '
                      'split_seed=N, default 0)')
  parser.add_argument('--workdir', default='runs/grid')
  parser.add_argument('--data_dir', default='', help='real data folder (pneumonia or aptos); '
                      'with --dataset=both use --pneumonia_dir and --aptos_dir')
  parser.add_argument('--pneumonia_dir', default='')
  parser.add_argument('--aptos_dir', default='')
  parser.add_argument('--cells', default='', help=f'subset of {",".join(report.CELL_ORDER)} '
                      '(none = original; default all)')
  parser.add_argument('--recipes', default='paper',
                      help='comma-separated recipes, each run for every cell: some of '
                      f'{", ".join(default_config.RECIPES)} (default: paper)')
  parser.add_argument('--archs', default='', help='comma-separated architectures, each run for '
                      'every cell with its preset: some of '
                      f'{", ".join(choices.get("arch", ()))}; default: '
                      'the preset\'s (or --set arch=...)')
  parser.add_argument('--epsilons', default='', help='comma-separated target epsilons of the '
                      "DP-SGD cells (default: the paper's beta = 1, 2, 4, i.e. 1, 0.5, 0.25)")
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help='override a config field for every cell, parsed as the flag '
                      '--FIELD=VALUE of experiments.run (python -m experiments.run --help lists '
                      'them), e.g. --set epochs=2')
  return parser


def parse_overrides(texts: list[str]) -> dict[str, object]:
  """The `--set FIELD=VALUE` overrides, parsed like run's flags; FlagError names the bad one."""
  fields = default_config.get_config()
  overrides = {}
  for text in texts:
    name, value = cli.parse_override(text, fields)
    if name in GRID_FIELDS:
      raise FlagError(f'--set {name}: the grid sets {name} for each cell; use {GRID_FIELDS[name]}')
    overrides[name] = value
  return overrides


def _parse_seeds(text: str) -> list[int]:
  seeds = [cli.parse_value('seeds', s.strip(), 0) for s in text.split(',') if s.strip()]
  if not seeds:
    raise FlagError(f'--seeds: expected comma-separated integers, got {text!r}')
  return seeds


def _parse_cells(text: str, cells=report.CELLS) -> set[str]:
  names = [report.cell_name(mech, beta) for mech, beta in cells]
  wanted = {'original' if c.strip() == 'none' else c.strip() for c in text.split(',') if c.strip()}
  unknown = sorted(wanted - set(names))
  if unknown:
    raise FlagError(f'--cells: unknown cell(s) {",".join(unknown)}; '
                    f'expected some of {",".join(names)}')
  return wanted


def _parse_recipes(text: str) -> list[str]:
  recipes = [r.strip() for r in text.split(',') if r.strip()]
  unknown = sorted(set(recipes) - set(default_config.RECIPES))
  if not recipes or unknown:
    raise FlagError(f'--recipes: expected some of {",".join(default_config.RECIPES)}, got {text!r}')
  return recipes


def _parse_archs(text: str) -> list[str | None]:
  archs = [a.strip() for a in text.split(',') if a.strip()]
  from dpjax.models import ARCHITECTURES  # Deferred: imports JAX.
  unknown = sorted(set(archs) - set(ARCHITECTURES))
  if unknown:
    raise FlagError(f'--archs: expected some of {",".join(ARCHITECTURES)}, got {text!r}')
  return archs or [None]


def _parse_epsilons(text: str) -> list[float]:
  values = [cli.parse_value('epsilons', e.strip(), 0.0) for e in text.split(',') if e.strip()]
  # inf would make beta = 1/inf = 0: the non-private cell is `original`, not an epsilon.
  if any(not (v > 0 and math.isfinite(v)) for v in values):
    raise FlagError(f'--epsilons: expected positive finite numbers (the non-private cell is '
                    f'--cells=original), got {text!r}')
  return values


def _check_choices(args) -> tuple[str, ...]:
  """The datasets to run; FlagError for a bad --dataset or --protocol."""
  # Deferred: these modules import TFDS and JAX, and `--help` should stay instant.
  from dpjax.data.datasets import DATASETS
  from experiments.config_checks import PROTOCOLS
  if args.dataset not in (*DATASETS, 'both'):
    raise FlagError(f'--dataset must be one of {"|".join((*DATASETS, "both"))}, '
                    f'got {args.dataset!r}')
  if args.protocol not in PROTOCOLS:
    raise FlagError(f'--protocol must be one of {"|".join(PROTOCOLS)}, got {args.protocol!r}')
  if args.dataset == 'both' and args.data_dir:
    raise FlagError('--data_dir names one dataset\'s folder; with --dataset=both use '
                    f'{" and ".join(f"--{d}_dir" for d in DATASETS)}')
  return DATASETS if args.dataset == 'both' else (args.dataset,)


def cell_configs(args) -> list:
  """One config per (dataset, cell, seed), in run order; FlagError (a ValueError) names a bad
  flag before anything runs."""
  overrides = parse_overrides(args.set)
  seeds = _parse_seeds(args.seeds)
  recipes = _parse_recipes(args.recipes)
  archs = _parse_archs(args.archs)
  cells = report.cells_for(_parse_epsilons(args.epsilons))
  wanted = _parse_cells(args.cells, cells)
  configs = []
  for dataset in _check_choices(args):
    data_dir = getattr(args, f'{dataset}_dir', '') or args.data_dir  # data_dir: one dataset.
    for recipe, arch in itertools.product(recipes, archs):
      for mech, beta in cells:
        name = report.cell_name(mech, beta)
        if wanted and name not in wanted:
          continue
        for seed in seeds:
          config = default_config.preset(
              protocol=args.protocol, demo_data=not data_dir, recipe=recipe,
              arch=arch or overrides.get('arch', default_config.get_config().arch), mech=mech)
          config.update(dataset=dataset, mech=mech, beta=1.0 if beta is None else beta, seed=seed,
                        data_dir=data_dir)
          config.update(overrides)
          folder = Path(args.workdir) / args.protocol / dataset / recipe
          if arch:
            config.arch = arch
            folder = folder / arch
          config.workdir = str(folder / f'{name}_seed{seed}')
          configs.append(config)
  return configs


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
  try:
    configs = cell_configs(args)
    from experiments import config_checks  # Deferred like _check_choices' imports.
    for config in configs:  # Every cell's values, before any cell runs.
      config_checks.validate_config(config)
  except ValueError as e:
    sys.stderr.write(f'error: {e}\n')
    return EXIT_BAD_INPUT
  from experiments import remote_paths
  try:
    # gs:// (and other epath URLs) in --workdir, the data flags or --set cache_dir: the grid
    # runs on local copies, pushed back as it goes and at the end.
    with remote_paths.staged_grid(args) as local_args:
      return _main(local_args, shown_workdir=args.workdir)
  except Exception as e:  # pylint: disable=broad-except
    code = failure_exit_code(e)
    if code is None:
      raise
    return code


def _main(args, shown_workdir: str) -> int:
  configs = cell_configs(args)  # Again, with the local paths.
  from experiments import steps
  from experiments import train
  from experiments.workdir import FolderLock
  from experiments.workdir import check_writable_dir
  out = Path(args.workdir) / args.protocol
  # One grid at a time per folder: two would each write table.md with their own cells only, and
  # the later one would silently drop the other's rows.
  lock = FolderLock(out, GRID_LOCK_FILE, 'another grid')
  check_writable_dir(out, '--workdir')
  lock.acquire()
  try:
    return _run_cells(configs, out, train, steps, shown_workdir)
  finally:
    lock.release()


def _number(value, spec: str = '.3f') -> str:
  """'0.812', 'inf', '-' (None: the non-private cell's epsilon)."""
  if value is None:
    return '-'
  return format(value, spec) if isinstance(value, (int, float)) else str(value)


def cell_line(config, results: dict, out: Path, seconds: float) -> str:
  """One line for a finished cell: its name, seed, test balanced accuracy and ROC AUC (or QW
  kappa) of the selected model, epsilon, and the wall time of this invocation."""
  folder = Path(config.workdir)
  name = folder.name.removesuffix(f'_seed{config.seed}')
  try:
    name = str(folder.parent.relative_to(out) / name)
  except ValueError:
    pass
  test = results['release']['test_metrics']
  ranked = (f'ROC AUC {_number(test["roc_auc"])}' if 'roc_auc' in test
            else f'QW kappa {_number(test.get("quadratic_weighted_kappa"))}')
  took = 'reused' if results.get('reused') else f'{seconds:.0f} s'
  return (f'done {name} seed {config.seed}: test balanced accuracy '
          f'{_number(test["balanced_accuracy"])}, {ranked}; epsilon '
          f'{_number(results.get("epsilon"), ".3g")} ({took})')


def _run_cells(configs, out: Path, train, steps, shown_workdir: str) -> int:
  from experiments import selection as selection_lib  # Deferred like train's import.
  from experiments.config_checks import ConfigError
  results = []
  for i, config in enumerate(configs):
    print(f'[{i + 1}/{len(configs)}] {config.workdir}', flush=True)
    start = time.time()
    try:
      results.append(train.train_and_evaluate(config))
    except steps.TrainingDiverged as e:
      sys.stderr.write(f'error: {config.workdir}: {e}\n')
      return EXIT_DIVERGED
    except selection_lib.SelectionRuleChanged as e:
      # The cell folders are the grid's: the flag to change is the grid's own --workdir.
      cell = Path(config.workdir).relative_to(out.parent)
      raise ConfigError(f'--workdir={shown_workdir}: its cell {cell} {e.why_for("this grid")}; '
                        'use a new --workdir') from None
    print(f'[{i + 1}/{len(configs)}] {cell_line(config, results[-1], out, time.time() - start)}',
          flush=True)
  written = report.write_reports(results, out)
  for path in written:
    print(f'wrote {path}')
  return 0


if __name__ == '__main__':
  exit_promptly_on_signals()
  sys.exit(main())
