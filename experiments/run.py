"""Train one model: `python -m experiments.run --dataset=pneumonia --mech=dpsgd --beta=1`.

Every field of `experiments/configs/default.py` is a flag (`experiments.cli`; a bare boolean
flag such as `--audit` means `--audit=true`). Without `--data_dir` the run uses
the built-in synthetic demo data and the demo preset (small images, few epochs); flags given
explicitly always win. Bad input exits with code 2 and a one-line message, writing nothing.
`--data_dir`, `--workdir`, `--cache_dir` and `--weights` may be `gs://` (or other etils.epath)
URLs: the run works on local copies (`experiments/remote_paths.py`).
"""

from __future__ import annotations

import argparse
import os
import sys

from experiments.cli import DEFAULTS_NOTE
from experiments.cli import OneLineParser
from experiments.cli import add_config_flags
from experiments.cli import exit_promptly_on_signals
from experiments.cli import failure_exit_code
from experiments.configs import default as default_config


def build_parser() -> argparse.ArgumentParser:
  parser = OneLineParser(prog='python -m experiments.run', description=f'{__doc__}\n{DEFAULTS_NOTE}',
                          usage='%(prog)s [--FIELD=VALUE ...]',
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  add_config_flags(parser, default_config.get_config())
  return parser


def make_config(argv: list[str]):
  """Flags -> ConfigDict: defaults, the demo preset when no data_dir, the paper preset with
  --protocol=paper, the modern recipe with --recipe=modern, the ScatterNet settings with
  --arch=scatternet|scatternet_cnn, then the explicit flags (which always win)."""
  args = build_parser().parse_args(argv)
  defaults = default_config.get_config()
  config = default_config.preset(protocol=args.protocol or defaults.protocol,
                                 demo_data=not args.data_dir, recipe=args.recipe or defaults.recipe,
                                 arch=args.arch or defaults.arch, mech=args.mech or defaults.mech)
  for name, value in vars(args).items():
    if value is not None:
      config[name] = value
  return config


def main(argv: list[str] | None = None) -> int:
  config = make_config(sys.argv[1:] if argv is None else argv)
  # XLA's own C++ log lines (slow_operation_alarm blocks, the coordination service's notes on
  # a lost peer) are noise next to dpjax's one-line messages; TF_CPP_MIN_LOG_LEVEL=0 shows them.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')  # Read when jaxlib loads: set before.
  # Heavy imports after flag parsing, so `--help` and flag errors are instant.
  from experiments import config_checks
  from experiments import parallel
  from experiments import remote_paths
  from experiments import results as results_lib
  from experiments import train
  try:
    config_checks.validate_config(config)  # Before any bucket is read or written.
    # gs:// (and other epath URLs): local copies for the run, pushed back as it goes.
    with remote_paths.staged(config) as local_config:
      results = train.train_and_evaluate(local_config)
  except KeyboardInterrupt:
    sys.stderr.write('interrupted: no results.json was written\n')
    return 130
  except Exception as e:  # pylint: disable=broad-except
    code = failure_exit_code(e)
    if code is not None:
      return code
    parallel.exit_if_a_peer_failed(e)
    raise
  if parallel.is_first_process():
    for line in results_lib.summary_lines(results):
      print(line)
  return 0


if __name__ == '__main__':
  exit_promptly_on_signals()
  sys.exit(main())
