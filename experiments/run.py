"""Train one model: `python -m experiments.run --dataset=pneumonia --mech=dpsgd --beta=1`.

Every field of `experiments/configs/default.py` is a flag. Without `--data_dir` the run uses
the built-in synthetic demo data and the demo preset (small images, few epochs); flags given
explicitly always win. Bad input exits with code 2 and a one-line message, writing nothing.
"""

from __future__ import annotations

import argparse
import sys

from experiments.configs import default as default_config

EXIT_BAD_INPUT = 2


class OneLineParser(argparse.ArgumentParser):
  """argparse, but errors are one line naming the flag (no usage dump) and exit 2."""

  def error(self, message):
    sys.stderr.write(f'error: {message} (see --help)\n')
    sys.exit(EXIT_BAD_INPUT)


def _bool(text: str) -> bool:
  lowered = text.lower()
  if lowered in ('1', 'true', 'yes'):
    return True
  if lowered in ('0', 'false', 'no'):
    return False
  raise argparse.ArgumentTypeError(f'expected true or false, got {text!r}')


def build_parser() -> argparse.ArgumentParser:
  parser = OneLineParser(prog='python -m experiments.run', description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  for name, value in default_config.get_config().items():
    kind = _bool if isinstance(value, bool) else type(value)
    parser.add_argument(f'--{name}', type=kind, default=None, metavar=kind.__name__.upper(),
                        help=f'default: {value!r}')
  return parser


def make_config(argv: list[str]):
  """Flags -> ConfigDict: defaults, then the demo preset when no data_dir, then explicit flags."""
  args = build_parser().parse_args(argv)
  config = default_config.get_config()
  if not args.data_dir:
    default_config.demo(config)
  for name, value in vars(args).items():
    if value is not None:
      config[name] = value
  return config


def main(argv: list[str] | None = None) -> int:
  config = make_config(sys.argv[1:] if argv is None else argv)
  # Heavy imports after flag parsing, so `--help` and flag errors are instant.
  from dpjax import experiment
  from dpjax.errors import UserInputError
  try:
    results = experiment.train_and_evaluate(config)
  except UserInputError as e:
    sys.stderr.write(f'error: {e}\n')
    return EXIT_BAD_INPUT
  except KeyboardInterrupt:
    sys.stderr.write('interrupted: no results.json was written\n')
    return 130
  for line in experiment.summary_lines(results):
    print(line)
  return 0


if __name__ == '__main__':
  sys.exit(main())
