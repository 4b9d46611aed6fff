"""The one flag parser of `experiments.run` and `experiments.grid`.

Every field of `experiments/configs/default.py` is a flag (`add_config_flags`), and the grid's
`--set FIELD=VALUE` goes through the same value parser (`parse_value`), so the same text means
the same value everywhere: booleans are true/false/1/0/yes/no in any case and nothing else (a
bare `--audit` means `--audit=true`), integers refuse '1.5', floats take '1e-5', strings are
taken as given. Bad input is one line on stderr and exit code 2 (`OneLineParser`, `FlagError`).

Also here: the exit codes, the one line a user error prints (`error_line`) and the prompt exit
on Ctrl-C / SIGTERM (`exit_promptly_on_signals`). Nothing here imports JAX.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3  # The run itself failed (non-finite loss): not bad input.

TRUE_WORDS = ('true', '1', 'yes')
FALSE_WORDS = ('false', '0', 'no')


class FlagError(ValueError):
  """A flag or `--set` value that cannot be parsed; the message names the flag."""


class OneLineParser(argparse.ArgumentParser):
  """argparse, but errors are one line naming the flag (no usage dump) and exit 2.

  Abbreviated flags are refused: `--epoch=3` is an error, not `--epochs=3`.
  """

  def __init__(self, *args, **kwargs):
    kwargs.setdefault('allow_abbrev', False)
    super().__init__(*args, **kwargs)

  def error(self, message):
    sys.stderr.write(f'error: {message} (see --help)\n')
    sys.exit(EXIT_BAD_INPUT)


def parse_bool(text: str) -> bool:
  lowered = text.lower()
  if lowered in TRUE_WORDS:
    return True
  if lowered in FALSE_WORDS:
    return False
  raise ValueError(f'expected true|false (or 1|0, yes|no), got {text!r}')


def parse_int(text: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise ValueError(f'expected an integer, got {text!r}') from None


def parse_float(text: str) -> float:
  try:
    return float(text)
  except ValueError:
    raise ValueError(f'expected a number, got {text!r}') from None


def parse_str(text: str) -> str:
  return text


# bool before int: bool is a subclass of int.
_PARSERS: tuple[tuple[type, Callable[[str], object]], ...] = (
    (bool, parse_bool), (int, parse_int), (float, parse_float), (str, parse_str))


def value_parser(default: object) -> Callable[[str], object]:
  """The parser of a field whose default is `default` (its type decides)."""
  for kind, parser in _PARSERS:
    if isinstance(default, kind):
      return parser
  raise TypeError(f'no flag parser for values of type {type(default).__name__}')


def parse_value(name: str, text: str, default: object) -> object:
  """`text` as the value of config field `name` (default `default`); FlagError names it."""
  try:
    return value_parser(default)(text)
  except ValueError as e:
    raise FlagError(f'--{name}: {e}') from None


def _argparse_type(default: object) -> Callable[[str], object]:
  parser = value_parser(default)

  def parse(text: str) -> object:
    try:
      return parser(text)
    except ValueError as e:  # argparse prefixes 'argument --name: '.
      raise argparse.ArgumentTypeError(str(e)) from None

  parse.__name__ = type(default).__name__  # What argparse names in its messages.
  return parse


def add_config_flags(parser: argparse.ArgumentParser, config: Mapping[str, object]) -> None:
  """One `--FIELD=VALUE` flag per field of `config`; unset flags parse to None.

  Boolean flags may be given bare: `--audit` is `--audit=true`.
  """
  for name, default in config.items():
    kind = type(default).__name__
    if isinstance(default, bool):
      parser.add_argument(f'--{name}', type=_argparse_type(default), nargs='?', const=True,
                          default=None, metavar='BOOL', help=f'default: {default!r}')
    else:
      parser.add_argument(f'--{name}', type=_argparse_type(default), default=None,
                          metavar=kind.upper(), help=f'default: {default!r}')


def parse_override(text: str, config: Mapping[str, object]) -> tuple[str, object]:
  """`FIELD=VALUE` (the grid's `--set`) -> (field, value), parsed as the flag `--FIELD=VALUE`."""
  name, sep, value = text.partition('=')
  if not sep or not name:
    raise FlagError(f'--set {text!r}: expected FIELD=VALUE')
  if name not in config:
    raise FlagError(f'--set {text!r}: {name!r} is not a config field '
                    '(see python -m experiments.run --help)')
  try:
    return name, value_parser(config[name])(value)
  except ValueError as e:
    raise FlagError(f'--set {name}: {e}') from None


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
