"""The one flag parser of `experiments.run` and `experiments.grid`.

Every field of `experiments/configs/default.py` is a flag (`add_config_flags`), and the grid's
`--set FIELD=VALUE` goes through the same value parser (`parse_value`), so the same text means
the same value everywhere: booleans are true/false/1/0/yes/no in any case and nothing else (a
bare `--audit` means `--audit=true`), integers refuse '1.5', floats take '1e-5', strings are
taken as given. Bad input is one line on stderr and exit code 2 (`OneLineParser`, `FlagError`).

`--help` is generated, never written by hand: each flag's description is its field's comment in
`experiments/configs/default.py` (`field_comments`), its allowed values are the constants that
`experiments/config_checks.py` validates it against (`field_choices`, read from the source
without importing it), and its defaults are those of `default.preset` for real and demo data and
for the presets that change it (`default_text`).

Also here: the exit codes, the one line a user error prints (`error_line`) and the prompt exit
on Ctrl-C / SIGTERM (`exit_promptly_on_signals`). Nothing here imports JAX.
"""

from __future__ import annotations

import argparse
import ast
import functools
import io
import os
import select
import signal
import sys
import threading
import time
import tokenize
from collections.abc import Callable, Mapping
from pathlib import Path

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


# --help: descriptions, choices and defaults.

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_MODULE = 'experiments.configs.default'
CHECKS_MODULE = 'experiments.config_checks'  # Where each field's allowed values are checked.

# The --help sections, in order; a field named in none of them goes under OTHER_GROUP.
FLAG_GROUPS = (
    ('privacy: mechanism, guarantee, accounting and audit', (
        'protocol', 'mech', 'beta', 'epsilon', 'delta', 'noise_multiplier', 'l2_norm_clip',
        'sampling', 'privacy_unit', 'max_images_per_patient', 'clip_group_size',
        'clipping_method', 'accountant', 'ldp_variant', 'noise_seed',
        'feature_stats_noise_multiplier', 'feature_stats_clip', 'audit', 'audit_canaries')),
    ('model', (
        'arch', 'weights', 'norm', 'feature_norm', 'trainable', 'compute_dtype',
        'cache_features')),
    ('data', (
        'dataset', 'data_dir', 'cache_dir', 'split_seed', 'image_size', 'augment', 'augmult',
        'skip_bad')),
    ('training', (
        'recipe', 'seed', 'epochs', 'batch_size', 'microbatch_size', 'learning_rate',
        'momentum', 'weight_decay', 'lr_schedule', 'plateau_patience', 'averaging', 'ema_decay',
        'selection', 'eval_batch_size')),
    ('output and deployment', (
        'workdir', 'progress', 'metric_writers', 'checkpoint_every_steps', 'distributed',
        'coordinator_address', 'num_processes', 'process_id', 'heartbeat_timeout_s')),
)
OTHER_GROUP = 'other settings'

DEFAULTS_NOTE = """\
Defaults: each flag shows its default on real data (--data_dir) and, where the demo preset
differs, on the built-in demo data (no --data_dir), e.g. "default: 50 (demo data: 10)".
--protocol=paper, --recipe=modern and the ScatterNets (--arch=scatternet|scatternet_cnn) apply
presets on top; a flag they change lists their values, e.g. "--recipe=modern: 0.5". Flags given
explicitly always win."""


def _module_file(module: str) -> Path | None:
  """The source file of `module` in this repository (not imported), or None."""
  base = REPO_ROOT.joinpath(*module.split('.'))
  for path in (base.with_suffix('.py'), base / '__init__.py'):
    if path.is_file():
      return path
  return None


class _Unresolved(Exception):
  """An expression that `_StaticModule.evaluate` does not evaluate."""


class _StaticModule:
  """A module's top-level constants, read from its source without importing it.

  Evaluates string constants, tuples and lists of them (with `*` unpacking), dicts (their keys),
  `tuple(...)` / `list(...)`, names assigned at top level and names or `module.NAME` imported
  from other modules of this repository (followed through re-exports). Anything else raises
  `_Unresolved`. The modules that define the choices import JAX; `--help` must stay instant.
  """

  def __init__(self, module: str):
    path = _module_file(module)
    if path is None:
      raise _Unresolved(module)
    self.name = module
    self.tree = ast.parse(path.read_text(), str(path))
    self.assigned: dict[str, ast.expr] = {}
    self.imported: dict[str, tuple[str, str | None]] = {}  # name -> (module, attribute|None)
    package = module if path.name == '__init__.py' else module.rpartition('.')[0]
    for node in self.tree.body:
      if isinstance(node, ast.Assign):
        for target in node.targets:
          if isinstance(target, ast.Name):
            self.assigned[target.id] = node.value
      elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
        self.assigned[node.target.id] = node.value
      elif isinstance(node, ast.ImportFrom) and node.module != '__future__':
        source = node.module or ''
        if node.level:  # Relative import.
          source = '.'.join([*package.split('.')[:len(package.split('.')) - node.level + 1],
                             *([source] if source else [])])
        for alias in node.names:
          submodule = f'{source}.{alias.name}'
          self.imported[alias.asname or alias.name] = (
              (submodule, None) if _module_file(submodule) else (source, alias.name))
      elif isinstance(node, ast.Import):
        for alias in node.names:
          if alias.asname:
            self.imported[alias.asname] = (alias.name, None)

  def constant(self, name: str, depth: int = 0):
    if depth > 8:
      raise _Unresolved(name)
    if name in self.assigned:
      return self.evaluate(self.assigned[name], depth + 1)
    if name in self.imported:
      module, attribute = self.imported[name]
      if attribute is None:
        raise _Unresolved(name)  # A module, not a value.
      return _static_module(module).constant(attribute, depth + 1)
    raise _Unresolved(name)

  def evaluate(self, node: ast.expr, depth: int = 0):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
      return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
      values = []
      for element in node.elts:
        if isinstance(element, ast.Starred):
          values.extend(self._sequence(element.value, depth))
        else:
          values.append(self.evaluate(element, depth))
      return tuple(values)
    if isinstance(node, ast.Dict) and None not in node.keys:
      return tuple(self.evaluate(key, depth) for key in node.keys)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        and node.func.id in ('tuple', 'list') and len(node.args) == 1 and not node.keywords):
      return self._sequence(node.args[0], depth)
    if isinstance(node, ast.Name):
      return self.constant(node.id, depth)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
      module, attribute = self.imported.get(node.value.id, (None, ''))
      if module is not None and attribute is None:
        return _static_module(module).constant(node.attr, depth + 1)
    raise _Unresolved(ast.dump(node))

  def _sequence(self, node: ast.expr, depth: int) -> tuple:
    value = self.evaluate(node, depth)
    if not isinstance(value, tuple):
      raise _Unresolved(ast.dump(node))
    return value


@functools.cache
def _static_module(module: str) -> _StaticModule:
  return _StaticModule(module)


def _string_tuple(value) -> bool:
  return isinstance(value, tuple) and bool(value) and all(isinstance(v, str) for v in value)


@functools.cache
def field_choices() -> dict[str, tuple[str, ...]]:
  """{field: allowed values}, as `experiments/config_checks.py` checks them, without importing it.

  Two forms are read: the table of `for name, choices in (('dataset', datasets.DATASETS), ...)`
  and single checks `config.FIELD not in (...)`. The constants are evaluated from their own
  modules' source (`_StaticModule`), so the help lists the values the check accepts, not a copy.
  A field whose check takes another form simply shows no choices.
  """
  try:
    checks = _static_module(CHECKS_MODULE)
  except (_Unresolved, OSError, SyntaxError):
    return {}
  choices: dict[str, tuple[str, ...]] = {}
  single: dict[str, ast.expr] = {}
  for node in ast.walk(checks.tree):
    if isinstance(node, ast.For) and isinstance(node.iter, (ast.Tuple, ast.List)):
      for item in node.iter.elts:
        if (isinstance(item, ast.Tuple) and len(item.elts) == 2
            and isinstance(item.elts[0], ast.Constant) and isinstance(item.elts[0].value, str)):
          try:
            value = checks.evaluate(item.elts[1])
          except (_Unresolved, OSError, SyntaxError):
            continue
          if _string_tuple(value):
            choices.setdefault(item.elts[0].value, value)
    elif (isinstance(node, ast.Compare) and len(node.ops) == 1
          and isinstance(node.ops[0], ast.NotIn) and isinstance(node.left, ast.Attribute)
          and isinstance(node.left.value, ast.Name) and node.left.value.id == 'config'):
      single.setdefault(node.left.attr, node.comparators[0])
  for name, node in single.items():
    if name not in choices:
      try:
        value = checks.evaluate(node)
      except (_Unresolved, OSError, SyntaxError):
        continue
      if _string_tuple(value):
        choices[name] = value
  return choices


def _trailing_comments(source: str) -> dict[int, str]:
  """{line: its trailing comment} for lines with code then a comment; a comment continued on the
  next lines (comment only, same column) is joined to it."""
  tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
  layout = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENCODING, tokenize.ENDMARKER)
  code_lines = {line for token in tokens if token.type not in layout
                for line in range(token.start[0], token.end[0] + 1)}
  trailing: dict[int, tuple[int, str]] = {}  # line -> (column, text)
  alone: dict[int, tuple[int, str]] = {}  # Comment-only lines.
  for token in tokens:
    if token.type == tokenize.COMMENT:
      line, column = token.start
      text = token.string.lstrip('#').strip()
      (trailing if line in code_lines else alone)[line] = (column, text)
  comments = {}
  for line, (column, text) in trailing.items():
    following = line + 1
    while alone.get(following, (None,))[0] == column:
      text += ' ' + alone[following][1]
      following += 1
    comments[line] = text
  return comments


def comments_of_fields(source: str, function_name: str = 'get_config') -> dict[str, str]:
  """{field: its comment} for each `c.FIELD = value  # comment` in `function_name` of `source`
  (the comment of a multi-line value is the one on its last line); fields without a comment
  are left out, and source that does not parse gives {}."""
  try:
    tree = ast.parse(source)
    comments = _trailing_comments(source)
  except (SyntaxError, tokenize.TokenError, IndentationError):
    return {}
  fields = {}
  for function in tree.body:
    if not (isinstance(function, ast.FunctionDef) and function.name == function_name):
      continue
    for node in ast.walk(function):
      if isinstance(node, ast.Assign) and len(node.targets) == 1:
        target = node.targets[0]
        if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
            and node.end_lineno in comments):
          fields.setdefault(target.attr, comments[node.end_lineno])
  return fields


def _config_source() -> str:
  path = _module_file(CONFIG_MODULE)
  try:
    return path.read_text() if path else ''
  except OSError:
    return ''


@functools.cache
def field_comments() -> dict[str, str]:
  """{field: its comment} from `experiments/configs/default.py` (`comments_of_fields`)."""
  return comments_of_fields(_config_source())


@functools.cache
def field_order() -> tuple[str, ...]:
  """The fields in the order `get_config` assigns them (empty if its source cannot be read)."""
  try:
    tree = ast.parse(_config_source())
  except SyntaxError:
    return ()
  names = []
  for function in tree.body:
    if isinstance(function, ast.FunctionDef) and function.name == 'get_config':
      for node in ast.walk(function):
        if isinstance(node, ast.Assign):
          names += [t.attr for t in node.targets
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)]
  return tuple(dict.fromkeys(names))


def _shown(value: object) -> str:
  if isinstance(value, str):
    return value if value else "''"
  if isinstance(value, bool):
    return str(value).lower()
  return repr(value)


def _pair(real: object, demo: object) -> str:
  return _shown(real) if real == demo else f'{_shown(real)} (demo data: {_shown(demo)})'


@functools.cache
def _preset_defaults() -> tuple[dict, tuple]:
  """(defaults of the plain preset, ((label, keys set, defaults, compare with), ...)) where
  each defaults is {field: (on real data, on demo data)}."""
  from experiments.configs import default  # ml_collections only: no JAX.

  def values(**kwargs):
    real = default.preset(demo_data=False, **kwargs)
    demo = default.preset(demo_data=True, **kwargs)
    return {name: (real[name], demo[name]) for name in real}

  scatternet = default.SCATTERNET_ARCHS[0]
  scatternet_label = 'ScatterNets'  # Both SCATTERNET_ARCHS get the same preset.
  base = values()
  variants = (
      ('--protocol=paper', {'protocol'}, values(protocol='paper'), base),
      *((f'--recipe={recipe}', {'recipe'}, values(recipe=recipe), base)
        for recipe in default.RECIPES if recipe != 'paper'),
  )
  on_scatternet = values(arch=scatternet)
  variants += ((scatternet_label, {'arch'}, on_scatternet, base),
               (f'{scatternet_label} with --mech=none', {'arch', 'mech'},
                values(arch=scatternet, mech='none'), on_scatternet))
  return base, variants


def default_text(name: str, fallback: object) -> str:
  """'default: REAL (demo data: DEMO)', then the presets that change it: '; --recipe=modern:
  ...'. A field the presets do not know shows `fallback`."""
  try:
    base, variants = _preset_defaults()
  except Exception:  # pylint: disable=broad-except
    base, variants = {}, ()  # --help must work even if a preset is broken.
  if name not in base:
    return f'default: {_shown(fallback)}'
  text = f'default: {_pair(*base[name])}'
  for label, keys, values, reference in variants:
    if name not in keys and name in values and values[name] != reference.get(name):
      text += f'; {label}: {_pair(*values[name])}'
  return text


def flag_help(name: str, default: object) -> str:
  """The --help text of `--NAME`: its comment, its choices, its defaults ('%' escaped)."""
  parts = []
  comment = field_comments().get(name)
  if comment:
    parts.append(comment)
  choices = field_choices().get(name)
  if choices:
    parts.append(f'Choices: {", ".join(choices)}.')
  defaults = default_text(name, default)
  parts.append(defaults[:1].upper() + defaults[1:] + '.')
  return ' '.join(parts).replace('%', '%%')


def add_config_flags(parser: argparse.ArgumentParser, config: Mapping[str, object]) -> None:
  """One `--FIELD=VALUE` flag per field of `config`; unset flags parse to None.

  Boolean flags may be given bare: `--audit` is `--audit=true`. The flags are listed in the
  sections of `FLAG_GROUPS`, each with its `flag_help`.
  """
  group_of = {name: title for title, names in FLAG_GROUPS for name in names}
  sections = {title: parser.add_argument_group(title) for title, _ in FLAG_GROUPS
              if any(group_of.get(name) == title for name in config)}

  def section(name):
    title = group_of.get(name, OTHER_GROUP)
    if title not in sections:
      sections[title] = parser.add_argument_group(title)
    return sections[title]

  # In FLAG_GROUPS order (a ConfigDict iterates sorted), then the others in field order.
  grouped = [name for _, names in FLAG_GROUPS for name in names if name in config]
  ordered = [*dict.fromkeys(grouped), *(name for name in field_order() if name not in grouped),
             *(name for name in config if name not in grouped)]
  for name in dict.fromkeys(ordered):
    if name not in config:
      continue
    default = config[name]
    kind = type(default).__name__
    help_text = flag_help(name, default)
    if isinstance(default, bool):
      section(name).add_argument(f'--{name}', type=_argparse_type(default), nargs='?',
                                 const=True, default=None, metavar='BOOL', help=help_text)
    else:
      section(name).add_argument(f'--{name}', type=_argparse_type(default), default=None,
                                 metavar=kind.upper(), help=help_text)


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


def failure_exit_code(error: BaseException) -> int | None:
  """For a failure the user can act on, writes its one line to stderr and returns the exit code
  (2 bad input, 3 diverged, 4 resumable: disk full or a bucket push failed); None for anything
  else, a bug whose traceback should go through."""
  # Deferred: these import JAX and orbax, and `--help` must stay instant; at a failure the
  # cost is a second or two at most.
  from dpjax.errors import UserInputError
  from experiments.checkpoint import DiskFull
  from experiments.remote_paths import PushFailed
  from experiments.steps import TrainingDiverged
  if isinstance(error, UserInputError):
    line, code = error_line(error), EXIT_BAD_INPUT
  elif isinstance(error, TrainingDiverged):
    line, code = f'error: {error}', EXIT_DIVERGED
  elif isinstance(error, (DiskFull, PushFailed)):
    line, code = f'error: {error}', error.exit_code
  else:
    return None
  sys.stderr.write(line + '\n')
  return code


# What to do when a signal ends the process (see `on_signal_exit`); run in order.
_EXIT_HOOKS: list[Callable[[], None]] = []
EXIT_HOOKS_ENV = 'DPJAX_SYNC_ON_EXIT_S'
EXIT_HOOKS_S = 25.0  # A preempted cloud VM gets about 30 s between SIGTERM and its end.


def on_signal_exit(hook: Callable[[], None]) -> Callable[[], None]:
  """Runs `hook()` when Ctrl-C or SIGTERM ends the process (`exit_promptly_on_signals`), before
  it exits: for at most $DPJAX_SYNC_ON_EXIT_S seconds (default 25), or until a second signal.
  The program goes on meanwhile. Returns a function that removes the hook."""
  _EXIT_HOOKS.append(hook)
  return lambda: _EXIT_HOOKS.remove(hook) if hook in _EXIT_HOOKS else None


def _exit_hooks_s() -> float:
  try:
    return max(0.0, float(os.environ.get(EXIT_HOOKS_ENV, EXIT_HOOKS_S)))
  except ValueError:
    return EXIT_HOOKS_S


def _run_exit_hooks(read_fd: int) -> None:
  """The hooks in a thread, until they end, the time is up or another signal arrives."""
  hooks = list(_EXIT_HOOKS)
  if not hooks:
    return
  done = threading.Event()

  def run():
    for hook in hooks:
      try:
        hook()
      except Exception as e:  # pylint: disable=broad-except  (the process is ending anyway)
        os.write(2, f'warning: {type(e).__name__}: {e}\n'.encode(errors='replace'))
    done.set()

  threading.Thread(target=run, daemon=True, name='signal-exit-hooks').start()
  deadline = time.monotonic() + _exit_hooks_s()
  while not done.is_set() and time.monotonic() < deadline:
    if select.select([read_fd], [], [], 0.1)[0]:
      return  # A second Ctrl-C: no more waiting.


def exit_promptly_on_signals() -> None:
  """Ctrl-C (SIGINT) or SIGTERM ends the process at once with 130 / 143 and one line.

  Python runs signal handlers only between bytecodes, so a KeyboardInterrupt waits for XLA to
  finish compiling, and unwinding through its threads could crash the interpreter. Instead
  the C-level handler writes the signal number to a pipe, and a watcher thread exits the
  process from there. Nothing is lost: checkpoints and results are written atomically, and a
  rerun of the same command resumes from the last checkpoint. Hooks registered with
  `on_signal_exit` (copying a remote workdir's finished files) run first, for a bounded time.
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
    _run_exit_hooks(read_fd)
    os._exit(128 + signum)

  threading.Thread(target=watch, daemon=True, name='signal-exit').start()
