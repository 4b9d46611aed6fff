"""Train one model: `python -m experiments.run --dataset=pneumonia --mech=dpsgd --beta=1`.

Every field of `experiments/configs/default.py` is a flag. Without `--data_dir` the run uses
the built-in synthetic demo data and the demo preset (small images, few epochs); flags given
explicitly always win. Bad input exits with code 2 and a one-line message, writing nothing.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from experiments.configs import default as default_config

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3  # The run itself failed (non-finite loss): not bad input.


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
  """Flags -> ConfigDict: defaults, the demo preset when no data_dir, the paper preset with
  --protocol=paper, then the explicit flags (which always win)."""
  args = build_parser().parse_args(argv)
  config = default_config.preset(protocol=args.protocol or default_config.get_config().protocol,
                                 demo_data=not args.data_dir)
  for name, value in vars(args).items():
    if value is not None:
      config[name] = value
  return config


def error_line(error: Exception) -> str:
  """The one line a user error prints; data errors that --skip_bad can skip say so."""
  message = f'error: {error}'
  if getattr(error, 'skippable', False):
    message += ' (pass --skip_bad=true to skip such files)'
  return message


def exit_promptly_on_signals() -> None:
  """Ctrl-C (SIGINT) or SIGTERM ends the process at once with 130 / 143 and one line.

  Python runs signal handlers only between bytecodes, so a KeyboardInterrupt waits for XLA to
  finish compiling, and unwinding through its threads could crash the interpreter. Instead
  the C-level handler writes the signal number to a pipe, and a watcher thread exits the
  process from there. Nothing is lost: checkpoints and results are written atomically, and a
  rerun of the same command resumes from the last checkpoint.
  """
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, lambda *_: None)  # Python-level no-op; the watcher acts.

  def watch():
    signum = os.read(read_fd, 1)[0]
    name = 'interrupted' if signum == signal.SIGINT else 'terminated'
    os.write(2, f'\n{name}: stopped; rerun the same command to resume from the last '
                f'checkpoint\n'.encode())
    os._exit(128 + signum)

  threading.Thread(target=watch, daemon=True, name='signal-exit').start()


def main(argv: list[str] | None = None) -> int:
  config = make_config(sys.argv[1:] if argv is None else argv)
  # Heavy imports after flag parsing, so `--help` and flag errors are instant.
  from experiments import results as results_lib
  from experiments import steps
  from experiments import train
  from dpjax.errors import UserInputError
  try:
    results = train.train_and_evaluate(config)
  except UserInputError as e:
    sys.stderr.write(error_line(e) + '\n')
    return EXIT_BAD_INPUT
  except steps.TrainingDiverged as e:
    sys.stderr.write(f'error: {e}\n')
    return EXIT_DIVERGED
  except KeyboardInterrupt:
    sys.stderr.write('interrupted: no results.json was written\n')
    return 130
  for line in results_lib.summary_lines(results):
    print(line)
  return 0


if __name__ == '__main__':
  exit_promptly_on_signals()
  sys.exit(main())
