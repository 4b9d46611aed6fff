"""The paper's experiment grid: `python -m experiments.grid --dataset=pneumonia`.

Runs original (no privacy), LDP beta=1,2,4 and DP-SGD beta=1,2,4 for one or both datasets and
several seeds, under the sound protocol (default) or the paper's, then writes `table.md`,
`table.csv` and figures under `--workdir`. A finished cell is reused, an interrupted one
resumes from its checkpoint. Without `--data_dir` it uses the demo data and the demo preset.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.configs import default as default_config
from experiments.run import EXIT_BAD_INPUT
from experiments.run import EXIT_DIVERGED
from experiments.run import OneLineParser
from experiments.run import error_line
from experiments.run import exit_promptly_on_signals

CELLS = (('none', None), ('ldp', 1.0), ('ldp', 2.0), ('ldp', 4.0),
         ('dpsgd', 1.0), ('dpsgd', 2.0), ('dpsgd', 4.0))


def build_parser() -> argparse.ArgumentParser:
  parser = OneLineParser(prog='python -m experiments.grid', description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--dataset', default='pneumonia', help='pneumonia | aptos | both')
  parser.add_argument('--protocol', default='sound', help='sound | paper')
  parser.add_argument('--seeds', default='0', help='comma-separated seeds, e.g. 0,1,2')
  parser.add_argument('--workdir', default='runs/grid')
  parser.add_argument('--data_dir', default='', help='real data folder (pneumonia or aptos); '
                      'with --dataset=both use --pneumonia_dir and --aptos_dir')
  parser.add_argument('--pneumonia_dir', default='')
  parser.add_argument('--aptos_dir', default='')
  parser.add_argument('--cells', default='', help='subset, e.g. none,ldp_b1,dpsgd_b1 (default all)')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help='override any config field for every cell, e.g. --set epochs=2')
  return parser


def cell_name(mech: str, beta: float | None) -> str:
  return 'original' if mech == 'none' else f'{mech}_b{beta:g}'


def _parse_override(text: str, config) -> tuple[str, object]:
  name, sep, value = text.partition('=')
  if not sep or name not in config:
    raise ValueError(f'--set {text!r}: expected FIELD=VALUE with a config field')
  current = config[name]
  if isinstance(current, bool):
    return name, value.lower() in ('1', 'true', 'yes')
  return name, type(current)(value)


def cell_configs(args) -> list:
  """One config per (dataset, cell, seed), in run order."""
  datasets = ('pneumonia', 'aptos') if args.dataset == 'both' else (args.dataset,)
  seeds = [int(s) for s in args.seeds.split(',') if s.strip()]
  wanted = {c.strip() for c in args.cells.split(',') if c.strip()}
  configs = []
  for dataset in datasets:
    data_dir = {'pneumonia': args.pneumonia_dir, 'aptos': args.aptos_dir}[dataset] or (
        args.data_dir if args.dataset != 'both' else '')
    for mech, beta in CELLS:
      name = cell_name(mech, beta)
      if wanted and name not in wanted and name.replace('original', 'none') not in wanted:
        continue
      for seed in seeds:
        config = default_config.preset(protocol=args.protocol, demo_data=not data_dir)
        config.update(dataset=dataset, mech=mech, beta=beta or 1.0, seed=seed, data_dir=data_dir)
        for text in args.set:
          field, value = _parse_override(text, config)
          config[field] = value
        config.workdir = str(Path(args.workdir) / args.protocol / dataset / f'{name}_seed{seed}')
        configs.append(config)
  return configs


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
  if args.dataset not in ('pneumonia', 'aptos', 'both'):
    sys.stderr.write(f'error: --dataset must be pneumonia|aptos|both, got {args.dataset!r}\n')
    return EXIT_BAD_INPUT
  if args.protocol not in ('sound', 'paper'):
    sys.stderr.write(f'error: --protocol must be sound|paper, got {args.protocol!r}\n')
    return EXIT_BAD_INPUT
  try:
    configs = cell_configs(args)
  except ValueError as e:
    sys.stderr.write(f'error: {e}\n')
    return EXIT_BAD_INPUT
  from experiments import report
  from experiments import steps
  from experiments import train
  from dpjax.errors import UserInputError
  results = []
  for i, config in enumerate(configs):
    print(f'[{i + 1}/{len(configs)}] {config.workdir}', flush=True)
    try:
      results.append(train.train_and_evaluate(config))
    except UserInputError as e:
      sys.stderr.write(error_line(e) + '\n')
      return EXIT_BAD_INPUT
    except steps.TrainingDiverged as e:
      sys.stderr.write(f'error: {config.workdir}: {e}\n')
      return EXIT_DIVERGED
  out = Path(args.workdir) / args.protocol
  written = report.write_reports(results, out)
  for path in written:
    print(f'wrote {path}')
  return 0


if __name__ == '__main__':
  exit_promptly_on_signals()
  sys.exit(main())
