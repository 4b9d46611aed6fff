"""The one flag parser: run's flags and the grid's `--set` parse the same text the same way.

Fast: nothing here trains (bad input must fail before anything runs).
"""

import re

import pytest

from experiments import cli
from experiments import grid
from experiments import report
from experiments import run
from experiments.configs import default as default_config
from experiments.published import PUBLISHED_ACCURACY

FIELDS = default_config.get_config()

# One representative text per field type, and the value it must parse to.
REPRESENTATIVE = {bool: ('YES', True), int: ('7', 7), float: ('1e-6', 1e-6), str: ('abc', 'abc')}


def _exit_code(fn, *args):
  try:
    return fn(*args)
  except SystemExit as e:  # argparse errors exit directly.
    return e.code


def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  return err


def _grid_config(tmp_path, *argv):
  args = grid.build_parser().parse_args(
      ['--cells=original', f'--workdir={tmp_path / "grid"}', *argv])
  (config,) = grid.cell_configs(args)
  return config


def test_bare_boolean_flag_means_true():
  assert run.make_config(['--audit']).audit is True
  assert run.make_config(['--audit']).to_dict() == run.make_config(['--audit=true']).to_dict()
  # A bare flag followed by another flag, and a value given as the next word.
  config = run.make_config(['--audit', '--epochs=3'])
  assert config.audit is True and config.epochs == 3
  assert run.make_config(['--audit', 'false']).audit is False


@pytest.mark.parametrize('text,value', [('false', False), ('FALSE', False), ('No', False),
                                        ('0', False), ('True', True), ('yes', True), ('1', True)])
def test_boolean_words_in_any_case(text, value):
  assert run.make_config([f'--audit={text}']).audit is value
  assert cli.parse_override(f'audit={text}', FIELDS) == ('audit', value)


@pytest.mark.parametrize('text', ['ture', '', 'y', '2', ' true', 'on'])
def test_bad_boolean_exits_2_naming_the_field(capsys, text):
  assert _exit_code(run.make_config, [f'--audit={text}']) == 2
  assert '--audit' in _one_error_line(capsys)
  assert grid.main(['--set', f'audit={text}']) == 2
  assert 'audit' in _one_error_line(capsys)


def test_grid_refuses_a_bad_set_before_running_anything(tmp_path, capsys):
  workdir = tmp_path / 'grid'
  # Before the fix, audit=ture silently meant audit=false.
  assert grid.main(['--set', 'audit=ture', f'--workdir={workdir}']) == 2
  err = _one_error_line(capsys)
  assert 'audit' in err and 'ture' in err
  assert grid.main(['--set', 'epochs=1.5', f'--workdir={workdir}']) == 2
  assert 'epochs' in _one_error_line(capsys)
  assert not workdir.exists()


def test_ints_refuse_fractions_and_floats_take_exponents(tmp_path, capsys):
  assert _exit_code(run.make_config, ['--epochs=1.5']) == 2
  assert '--epochs' in _one_error_line(capsys)
  with pytest.raises(cli.FlagError, match='epochs'):
    cli.parse_override('epochs=1.5', FIELDS)
  assert run.make_config(['--delta=1e-6']).delta == 1e-6
  assert _grid_config(tmp_path, '--set', 'delta=1e-6').delta == 1e-6


@pytest.mark.parametrize('name', list(FIELDS))
def test_same_text_same_value_in_run_and_grid(tmp_path, capsys, name):
  text, expected = REPRESENTATIVE[type(FIELDS[name])]
  from_run = run.make_config([f'--{name}={text}'])[name]
  assert from_run == expected and type(from_run) is type(expected)
  assert cli.parse_override(f'{name}={text}', FIELDS) == (name, from_run)
  if name in grid.GRID_FIELDS:
    # The grid sets these per cell from its own flags; --set says which flag to use.
    assert grid.main(['--set', f'{name}={text}']) == 2
    err = _one_error_line(capsys)
    assert name in err and grid.GRID_FIELDS[name].split()[0] in err
  else:
    from_grid = _grid_config(tmp_path, '--set', f'{name}={text}')[name]
    assert from_grid == from_run and type(from_grid) is type(from_run)


@pytest.mark.parametrize('argv', [['--no_such_flag'], ['--no_such_flag=1'], ['--epoch=3']])
def test_unknown_or_abbreviated_flags_exit_2(capsys, argv):
  assert _exit_code(run.make_config, argv) == 2
  assert argv[0].split('=')[0] in _one_error_line(capsys)
  assert _exit_code(grid.main, argv) == 2
  _one_error_line(capsys)


@pytest.mark.parametrize('argv,named', [
    (['--set', 'no_such_field=1'], 'no_such_field'),
    (['--set', 'epochs'], 'FIELD=VALUE'),
    (['--seeds=0,a'], '--seeds'),
    (['--cells=original,dpsgd_b3'], 'dpsgd_b3'),
    (['--dataset=mnist'], '--dataset'),
    (['--protocol=fast'], '--protocol'),
    (['--dataset=both', '--data_dir=/somewhere'], '--data_dir'),
])
def test_bad_grid_flags_exit_2_with_one_line(tmp_path, capsys, argv, named):
  assert grid.main([*argv, f'--workdir={tmp_path / "grid"}']) == 2
  assert named in _one_error_line(capsys)
  assert not (tmp_path / 'grid').exists()


def test_grid_cells_seeds_and_datasets(tmp_path):
  args = grid.build_parser().parse_args(
      ['--dataset=both', '--seeds=0,2', '--cells=none,dpsgd_b2', f'--workdir={tmp_path}'])
  configs = grid.cell_configs(args)
  assert [(c.dataset, c.mech, c.beta, c.seed) for c in configs] == [
      (d, mech, beta, seed) for d in ('pneumonia', 'aptos')
      for mech, beta in (('none', 1.0), ('dpsgd', 2.0)) for seed in (0, 2)]
  assert configs[-1].workdir.endswith('sound/aptos/paper/dpsgd_b2_seed2')


def test_one_cell_naming():
  assert report.CELL_ORDER == tuple(report.cell_name(m, b) for m, b in report.CELLS)
  assert report.CELL_ORDER[0] == 'original' and 'dpsgd_b4' in report.CELL_ORDER
  assert report.cell_of({'mech': 'none', 'beta': 1.0}) == 'original'
  assert report.cell_of({'mech': 'ldp', 'beta': 2.0}) == 'ldp_b2'
  for table in PUBLISHED_ACCURACY.values():
    assert set(table) == set(report.CELL_ORDER)


# --help: generated from the config's comments, the checks' constants and the presets.

# The fields whose help must list the allowed values, and where they are validated.
CHOICE_FIELDS = ('mech', 'arch', 'recipe', 'protocol', 'selection', 'dataset', 'norm',
                 'feature_norm', 'sampling', 'privacy_unit', 'accountant', 'ldp_variant',
                 'averaging', 'lr_schedule', 'trainable', 'clipping_method', 'compute_dtype')


def test_help_choices_are_the_constants_the_checks_use():
  from dpjax import accounting
  from dpjax import ldp
  from dpjax import models
  from dpjax.data import datasets
  from experiments import config_checks
  choices = cli.field_choices()
  assert set(CHOICE_FIELDS) <= set(choices)
  assert choices['mech'] == config_checks.MECHANISMS
  assert choices['arch'] == tuple(models.ARCHITECTURES)
  assert choices['dataset'] == datasets.DATASETS
  assert choices['recipe'] == default_config.RECIPES
  assert choices['selection'] == config_checks.SELECTIONS
  assert choices['norm'] == ('auto', *models.NORMS)
  assert choices['trainable'] == models.TRAINABLE
  assert choices['sampling'] == accounting.SAMPLINGS
  assert choices['accountant'] == accounting.ACCOUNTANTS
  assert choices['ldp_variant'] == ldp.VARIANTS
  assert choices['feature_norm'] == ('group_norm', 'data_norm')


@pytest.mark.parametrize('name', CHOICE_FIELDS)
def test_help_choices_are_what_validation_accepts(name):
  from experiments import config_checks
  choices = cli.field_choices()[name]
  # feature_norm is checked for ScatterNets only.
  config = default_config.preset(arch='scatternet' if name == 'feature_norm' else 'resnet18')
  config[name] = 'no_such_choice'
  with pytest.raises(config_checks.ConfigError, match=re.escape('|'.join(choices))):
    config_checks.validate_config(config)


def test_every_field_has_a_comment_and_a_section():
  comments = cli.field_comments()
  assert set(FIELDS) == set(comments), set(FIELDS) ^ set(comments)
  assert comments['epochs'].startswith('Passes over the training split')
  grouped = {name for _, names in cli.FLAG_GROUPS for name in names}
  assert set(FIELDS) <= grouped, set(FIELDS) - grouped
  assert set(cli.field_order()) == set(FIELDS)


def test_comments_of_fields_tolerate_missing_and_continued_comments():
  source = '''
def get_config():
  c = Box()
  c.plain = 1  # One line.
  c.bare = 2
  c.long = (3,
            4)  # On the last line.
  c.continued = 'x'  # First part,
                     # second part.
  # A section comment, not a field's.
  c.after_section = 5
  return c
'''
  assert cli.comments_of_fields(source) == {
      'plain': 'One line.', 'long': 'On the last line.', 'continued': 'First part, second part.'}
  assert cli.comments_of_fields('def get_config(:') == {}


def test_help_defaults_for_real_and_demo_data_and_presets():
  assert cli.default_text('epochs', 0) == 'default: 50 (demo data: 10)'
  assert cli.default_text('seed', 0) == 'default: 0'
  assert cli.default_text('delta', 0) == 'default: 1e-05; --protocol=paper: 0.0001'
  batch = cli.default_text('batch_size', 0)
  assert batch.startswith('default: 128 (demo data: 64); --recipe=modern: 256 (demo data: 64)')
  assert 'ScatterNets: 256' in batch and 'ScatterNets with --mech=none: 64' in batch
  assert cli.default_text('no_such_field', True) == 'default: true'
  # The defaults shown are what a run without the flag gets.
  assert run.make_config([]).epochs == 10
  assert run.make_config(['--data_dir=/somewhere']).epochs == 50


def test_help_shows_comments_choices_and_sections():
  text = ' '.join(run.build_parser().format_help().split())  # Unwrapped.
  for name in ('epochs', 'noise_seed', 'augment'):  # augment's comment has a '%'.
    assert ' '.join(cli.field_comments()[name].split()) in text, name
  assert '--mech STR' in text and 'Choices: none, ldp, dpsgd.' in text
  assert 'Choices: resnet18, resnet8, tiny, scatternet, scatternet_cnn.' in text
  assert 'Choices: auto, val_loss, val_auc, val_balanced_accuracy, val_kappa, last.' in text
  assert 'Default: 50 (demo data: 10).' in text
  assert 'Default: 224 (demo data: 64).' in text
  for title, _ in cli.FLAG_GROUPS:
    assert f'{title}:' in text
  assert f'{cli.OTHER_GROUP}:' not in text
  lines = [line.split()[0] for line in run.build_parser().format_help().splitlines() if line]
  assert (lines.index('privacy:') < lines.index('--mech') < lines.index('model:')
          < lines.index('--arch'))


def test_a_field_outside_the_sections_still_gets_a_flag():
  parser = cli.OneLineParser(prog='p')
  cli.add_config_flags(parser, {**FIELDS.to_dict(), 'zz_new_field': 3})
  text = parser.format_help()
  assert f'{cli.OTHER_GROUP}:' in text and 'Default: 3.' in text.split('--zz_new_field')[1]
  assert parser.parse_args(['--zz_new_field=4']).zz_new_field == 4


def test_failures_a_user_can_act_on_print_one_line_and_their_exit_code(capsys):
  """run, grid and tune share this mapping: one line and 2 / 3 / 4; a bug returns None and
  prints nothing, so its traceback goes through."""
  from dpjax.data.folders import DataError
  from experiments.checkpoint import DiskFull
  from experiments.config_checks import ConfigError
  from experiments.remote_paths import PushFailed
  from experiments.steps import TrainingDiverged
  cases = [(ConfigError('--epochs must be positive'), cli.EXIT_BAD_INPUT),
           (TrainingDiverged('the loss is nan at step 3'), cli.EXIT_DIVERGED),
           (DiskFull('/w', 'saving a checkpoint'), DiskFull.exit_code),
           (PushFailed('gs://b/run: push failed'), PushFailed.exit_code),
           (DataError('x.png: not an image'), cli.EXIT_BAD_INPUT)]
  skippable = DataError('y.png: cannot decode', skippable=True)
  cases.append((skippable, cli.EXIT_BAD_INPUT))
  for error, code in cases:
    assert cli.failure_exit_code(error) == code
    err = capsys.readouterr().err
    hint = ' (pass --skip_bad=true to skip such files)' if error is skippable else ''
    assert err == f'error: {error}{hint}\n', err
  assert {code for _, code in cases} == {2, 3, 4}
  assert cli.failure_exit_code(KeyError('bug')) is None
  assert capsys.readouterr().err == ''
