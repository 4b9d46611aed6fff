"""Accounted hyperparameter tuning: `python -m experiments.tune --epsilon=2 --search=...`.

A private random search whose epsilon covers the choice (Papernot & Steinke, ICLR 2022;
`dpjax/tuning.py`). The number of runs K is drawn ONCE from a truncated negative binomial
(`--eta`, `--gamma` or `--expected_runs`) or a Poisson law (`--mu`) with secret OS entropy;
each run trains DP-SGD on a configuration drawn, also secretly, uniformly from the grid of
`--search` values, with a fixed per-run noise multiplier calibrated so that the TUNED release
meets `--epsilon` at `--delta`; the run whose validation metric (the run's `--selection`) is
best is released. Example:

  python -m experiments.tune --dataset=pneumonia --arch=scatternet --epsilon=2 \\
      --search='learning_rate=0.05,0.1,0.2;l2_norm_clip=0.5,1' --eta=1 --expected_runs=5 \\
      --workdir=runs/tune

<workdir>/release/ is public: tuned_release.json (the selected run's release, the chosen
configuration, the total guarantee and the per-run ledgers it is computed from) and the
selected model. <workdir>/not_covered.json and <workdir>/tuning_state.json (0600) are the
curator's: K, the configurations drawn and the losers' scores are NOT covered by the
guarantee. A killed search resumes on rerun with the same flags: K and the configurations are
never redrawn, finished runs are reused from <workdir>/runs/. Bad input: one line, exit 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
from pathlib import Path

from experiments import cli
from experiments.cli import EXIT_BAD_INPUT
from experiments.cli import FlagError
from experiments.cli import OneLineParser
from experiments.cli import exit_promptly_on_signals
from experiments.cli import failure_exit_code
from experiments.configs import default as default_config

STATE_FILE = 'tuning_state.json'  # The curator's: K and the configurations drawn (0600).
NOT_COVERED_FILE = 'not_covered.json'  # The curator's: K, every run's score (0600).
RELEASE_FILE = 'tuned_release.json'  # Under <workdir>/release/: public.
STATE_FORMAT = 1
# Fields the tuner sets itself, or that must be the same in every run (the data, the split,
# the unit and the mechanism the guarantee is about): neither --search nor --set may change them.
FIXED_FIELDS = {
    'mech': 'tuning is of DP-SGD runs', 'epsilon': 'use --epsilon (the TOTAL)',
    'beta': 'use --epsilon (the TOTAL)', 'noise_multiplier': 'calibrated by the tuner',
    'workdir': 'use --workdir', 'dataset': 'use --dataset', 'data_dir': 'use --data_dir',
    'delta': 'use --delta', 'split_seed': 'one split for every run',
    'privacy_unit': 'one unit for every run', 'noise_seed': 'every run draws secret noise',
    'protocol': 'the sound protocol only',
    'distributed': 'one process draws K (a job of several would draw several)',
    'coordinator_address': 'one process draws K (a job of several would draw several)',
    'num_processes': 'one process draws K (a job of several would draw several)',
    'process_id': 'one process draws K (a job of several would draw several)'}
# Fields --set may fix but --search may not vary.
SEARCH_FIXED_FIELDS = {'selection': 'one rule scores every run: scores of different metrics do '
                                    'not compare'}
NOT_COVERED_NOTE = ('The curator\'s: how many runs were drawn and every run\'s score. Releasing '
                    'any of this is NOT covered by the tuned guarantee.')


def build_parser() -> argparse.ArgumentParser:
  parser = OneLineParser(prog='python -m experiments.tune', description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--dataset', default='pneumonia')
  parser.add_argument('--data_dir', default='', help='real data folder; empty = the demo data')
  parser.add_argument('--arch', default='', help='architecture (with its preset), e.g. scatternet')
  parser.add_argument('--epsilon', type=cli.parse_float, required=True,
                      help='TOTAL target epsilon of the tuned release (covers the selection)')
  parser.add_argument('--delta', type=cli.parse_float, default=default_config.DEFAULT_DELTA)
  parser.add_argument('--search', required=True, metavar='FIELD=V1,V2;FIELD=...',
                      help="the grid the configurations are drawn from, e.g. "
                      "'learning_rate=0.05,0.1;l2_norm_clip=0.5,1' (config fields, parsed as "
                      'experiments.run flags)')
  parser.add_argument('--distribution', default='tnb', help='tnb (truncated negative binomial, '
                      'K >= 1) or poisson (K >= 0; K = 0 releases nothing)')
  parser.add_argument('--eta', type=cli.parse_float, default=1.0,
                      help='TNB shape, > -1: 1 = geometric, 0 = logarithmic (default 1)')
  parser.add_argument('--gamma', type=cli.parse_float, default=0.0,
                      help='TNB parameter in (0, 1); or give --expected_runs')
  parser.add_argument('--expected_runs', type=cli.parse_float, default=0.0,
                      help='E[K] of the TNB (sets --gamma), or nothing with --mu')
  parser.add_argument('--mu', type=cli.parse_float, default=0.0, help='Poisson mean (>= 1)')
  parser.add_argument('--workdir', default='runs/tune')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help='override a config field of every run, as experiments.run --FIELD')
  return parser


def parse_search(text: str) -> dict[str, list]:
  """'a=1,2;b=x' -> {'a': [1, 2], 'b': ['x']}, each value parsed as the field's flag."""
  fields = default_config.get_config()
  space: dict[str, list] = {}
  for part in (p.strip() for p in text.split(';')):
    if not part:
      continue
    name, sep, values = part.partition('=')
    name = name.strip()
    if not sep or not values.strip():
      raise FlagError(f'--search: expected FIELD=V1,V2,..., got {part!r}')
    if name not in fields:
      raise FlagError(f'--search: unknown config field {name!r}')
    if name in FIXED_FIELDS:
      raise FlagError(f'--search: {name} cannot vary ({FIXED_FIELDS[name]})')
    if name in SEARCH_FIXED_FIELDS:
      raise FlagError(f'--search: {name} cannot vary ({SEARCH_FIXED_FIELDS[name]}); --set it')
    if name in space:
      raise FlagError(f'--search: {name} given twice')
    parsed = [cli.parse_value(name, v.strip(), fields[name]) for v in values.split(',')]
    if len(set(map(repr, parsed))) != len(parsed):
      raise FlagError(f'--search: {name} lists a value twice')
    space[name] = parsed
  if not space:
    raise FlagError('--search: expected at least one FIELD=V1,V2,...')
  return space


def _distribution(args) -> dict:
  """{'distribution': ..., params} from the flags; FlagError for a bad combination."""
  from dpjax import tuning
  if args.distribution == 'poisson':
    if args.gamma or args.expected_runs:
      raise FlagError('--distribution=poisson takes --mu, not --gamma or --expected_runs')
    if not args.mu >= 1:
      raise FlagError(f'--mu must be >= 1 for --distribution=poisson, got {args.mu:g}')
    return {'distribution': 'poisson', 'mu': float(args.mu)}
  if args.distribution != 'tnb':
    raise FlagError(f'--distribution must be tnb or poisson, got {args.distribution!r}')
  if args.mu:
    raise FlagError('--mu is for --distribution=poisson')
  if bool(args.gamma) == bool(args.expected_runs):
    raise FlagError('give one of --gamma and --expected_runs for --distribution=tnb')
  try:
    gamma = (args.gamma if args.gamma else
             tuning.tnb_gamma_for_mean(args.eta, args.expected_runs))
    tuning.expected_num_runs('tnb', eta=args.eta, gamma=gamma)  # Checks eta and gamma.
  except ValueError as e:
    raise FlagError(f'--eta/--gamma/--expected_runs: {e}') from None
  return {'distribution': 'tnb', 'eta': float(args.eta), 'gamma': float(gamma)}


def _law(distribution: dict) -> dict:
  return {k: v for k, v in distribution.items() if k != 'distribution'}


def base_config(args):
  """The config every run starts from (flags, --set), before its drawn values."""
  fields = default_config.get_config()
  overrides = {}
  for text in args.set:
    name, value = cli.parse_override(text, fields)
    if name in FIXED_FIELDS:
      raise FlagError(f'--set {name}: {FIXED_FIELDS[name]}')
    overrides[name] = value
  arch = args.arch or overrides.get('arch', fields.arch)
  config = default_config.preset(protocol='sound', demo_data=not args.data_dir, arch=arch,
                                 mech='dpsgd')
  config.update(dataset=args.dataset, data_dir=args.data_dir, mech='dpsgd', delta=args.delta)
  config.update(overrides)
  if args.arch:
    config.arch = args.arch
  if config.selection == 'last':
    raise FlagError('--set selection=last: every run would score the same and the first would '
                    'always be released; use a validation metric')
  if not (math.isfinite(args.epsilon) and args.epsilon > 0):
    raise FlagError(f'--epsilon must be positive and finite, got {args.epsilon:g}')
  return config


def _run_config(base, values: dict, noise_multiplier: float | None, workdir: Path):
  config = base.copy_and_resolve_references()
  config.update(values)
  if noise_multiplier is not None:
    config.noise_multiplier = noise_multiplier
  config.workdir = str(workdir)
  return config


def planned_ledger(config, num_units: int, unit: str, noise_multiplier: float):
  """The ledger a run of `config` at `noise_multiplier` records (what train.py records)."""
  from dpjax import accounting
  from experiments import privacy_plan
  fixed = config.copy_and_resolve_references()
  fixed.noise_multiplier = noise_multiplier
  plan = privacy_plan.plan_privacy(fixed, num_units, unit)
  ledger = accounting.PrivacyLedger(
      config.sampling, privacy_plan.shuffled_steps_per_epoch(config, num_units))
  for z in privacy_plan.feature_stats_releases(config):
    ledger.record_gaussian(z, 'feature_stats')
  ledger.record_steps(plan.accounted_noise_multiplier, plan.sampling_prob, plan.steps)
  return ledger


def _signature(config) -> str:
  """What decides a run's privacy apart from its noise: configurations sharing it share z."""
  from experiments import privacy_plan
  return json.dumps({'batch_size': config.batch_size, 'epochs': config.epochs,
                     'sampling': config.sampling,
                     'extras': list(privacy_plan.feature_stats_releases(config))}, sort_keys=True)


def calibrate(base, space: dict, distribution: dict, total_epsilon: float, delta: float,
              num_units: int, unit: str) -> tuple[dict[str, float], list, float]:
  """({signature: z}, per-run ledgers, tuned epsilon <= total_epsilon).

  Each distinct privacy signature of the grid gets its noise multiplier; the guarantee is
  computed on the per-order maximum of their RDP curves (a run is any one configuration,
  chosen independently of the data). Each signature is first calibrated alone to a per-search
  target; while the maximum exceeds the total, that target is lowered (a few passes at most)."""
  from dpjax import accounting
  from dpjax import tuning
  from experiments import privacy_plan
  from experiments.config_checks import ConfigError
  configs = {}
  for values in itertools.product(*space.values()):
    config = _run_config(base, dict(zip(space, values)), None, Path('.'))
    configs.setdefault(_signature(config), config)
  target = total_epsilon
  for _ in range(20):
    multipliers, ledgers = {}, []
    for signature, config in configs.items():
      plan = privacy_plan.plan_privacy(_with_z(config, 1.0), num_units, unit)
      try:
        z = tuning.calibrate_per_run_noise_multiplier(
            target, delta, plan.sampling_prob, plan.steps, **distribution,
            sampling=config.sampling,
            steps_per_epoch=privacy_plan.shuffled_steps_per_epoch(config, num_units),
            extra_gaussian_noise_multipliers=privacy_plan.feature_stats_releases(config))
      except accounting.EssentiallyNoPrivacy as e:
        raise ConfigError(f'--epsilon={total_epsilon:g}: {e}') from None
      except ValueError as e:
        raise ConfigError(f'--epsilon={total_epsilon:g} at --delta={delta:g}: {e}') from None
      multipliers[signature] = z
      ledgers.append(planned_ledger(config, num_units, unit, z))
    epsilon = tuning.tuned_epsilon(ledgers, delta, **distribution)
    if epsilon <= total_epsilon:
      return multipliers, ledgers, epsilon
    target *= 0.999 * total_epsilon / epsilon
  raise ConfigError(f'--search: could not calibrate the configurations to --epsilon='
                    f'{total_epsilon:g} together')


def _as_tuned(run_release: dict, epsilon: float, delta: float) -> dict:
  """The selected run's release, saying what covers it now: the tuned guarantee, not the
  single run's (its history's epsilon is one run's spending, renamed so)."""
  release = dict(run_release)
  release['covered_by'] = (f'({epsilon:.6g}, {delta:g})-DP for the tuned release (the search and '
                           'the choice included; see epsilon above)')
  release['history'] = [
      {('per_run_epsilon_spent' if k == 'epsilon' else k): v for k, v in record.items()}
      for record in run_release.get('history', [])]
  return release


def _relation(config) -> str:
  """Add/remove under Poisson sampling, replace-one under shuffled batches."""
  from dpjax import accounting
  return accounting.PrivacyLedger(
      config.sampling, 1 if config.sampling == 'shuffled' else None).neighbouring_relation


def _with_z(config, z: float):
  fixed = config.copy_and_resolve_references()
  fixed.noise_multiplier = z
  return fixed


def _request(args, space: dict, distribution: dict, base) -> dict:
  """What a resumed search must match: the flags that decide the draws and the guarantee."""
  return {'epsilon': args.epsilon, 'delta': args.delta, 'search': space,
          'distribution': distribution, 'base_config': base.to_dict()}


def _load_or_draw_state(workdir: Path, request: dict, space: dict, distribution: dict) -> dict:
  """The curator's state: read when it exists (never redrawn), else drawn now and written
  (0600) before any run starts."""
  from dpjax import tuning
  from experiments import provenance
  from experiments.config_checks import ConfigError
  path = workdir / STATE_FILE
  if path.exists():
    state = json.loads(path.read_text())
    if state.get('format') != STATE_FORMAT:
      raise ConfigError(f'--workdir={workdir}: {STATE_FILE} has an unknown format')
    if json.loads(json.dumps(request)) != state['request']:
      raise ConfigError(f'--workdir={workdir} holds a search with other flags (K and the '
                        'configurations drawn are kept, never redrawn): rerun with the same '
                        'flags or use another --workdir')
    return state
  rng = tuning.secret_generator()  # 256 bits of OS entropy; nothing about it is kept.
  k = tuning.draw_num_runs(rng, distribution['distribution'], **_law(distribution))
  grid = list(itertools.product(*space.values()))
  drawn = [dict(zip(space, grid[int(rng.integers(len(grid)))])) for _ in range(k)]
  state = {'format': STATE_FORMAT, 'request': json.loads(json.dumps(request)),
           'num_runs': k, 'configurations': drawn,
           'note': 'The curator\'s: K and the configurations drawn are NOT covered.'}
  provenance.write_json_atomic(path, state, mode=0o600)
  return state


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
  try:
    space = parse_search(args.search)
    distribution = _distribution(args)
    base = base_config(args)
    from experiments import config_checks
    relations = set()
    for values in itertools.product(*space.values()):
      config = _run_config(base, dict(zip(space, values)), 1.0, Path(args.workdir))
      config_checks.validate_config(config)
      relations.add(_relation(config))
    if len(relations) > 1:
      raise FlagError(f'--search: the configurations use different neighbouring relations '
                      f'({", ".join(sorted(relations))}); search one sampling at a time')
  except ValueError as e:
    sys.stderr.write(f'error: {e}\n')
    return EXIT_BAD_INPUT
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  try:
    return search(args, space, distribution, base)
  except Exception as e:  # pylint: disable=broad-except
    code = failure_exit_code(e)
    if code is None:
      raise
    return code


def search(args, space: dict, distribution: dict, base) -> int:
  from experiments.workdir import WorkdirLock
  from experiments.workdir import check_writable_dir
  workdir = Path(args.workdir)
  check_writable_dir(workdir, '--workdir')
  workdir.mkdir(parents=True, exist_ok=True)
  lock = WorkdirLock(workdir)  # Two searches on one folder would each draw a K.
  lock.acquire()
  try:
    return _search(args, space, distribution, base, workdir)
  finally:
    lock.release()


def _search(args, space: dict, distribution: dict, base, workdir: Path) -> int:
  from dpjax import accounting
  from dpjax import tuning
  from experiments import provenance
  from experiments import selection as selection_lib
  from experiments import steps
  from experiments import train
  from experiments.config_checks import ConfigError
  num_units, unit = train.training_units(base)
  multipliers, ledgers, epsilon = calibrate(base, space, distribution, args.epsilon,
                                            args.delta, num_units, unit)
  state = _load_or_draw_state(workdir, _request(args, space, distribution, base), space,
                              distribution)
  drawn = state['configurations']
  # Every run's folder is the curator's: how many there are is K.
  (workdir / 'runs').mkdir(mode=0o700, exist_ok=True)
  os.chmod(workdir / 'runs', 0o700)
  scores, runs, diverged = [], [], []
  for i, values in enumerate(drawn):
    config = _run_config(base, values, None, workdir / 'runs' / f'run_{i:03d}')
    config.noise_multiplier = multipliers[_signature(config)]
    try:
      results = train.train_and_evaluate(config)
    except selection_lib.SelectionRuleChanged as e:
      # The run folders are the search's: the flag to change is the search's --workdir.
      raise ConfigError(
          f'--workdir={workdir}: its run {i + 1} {e.why_for("this search")}; use a new '
          '--workdir (a new search draws K again: anything published from this one composes '
          'with it)') from None
    except steps.TrainingDiverged:
      # The run's outcome, scored -inf: the search goes on (a rerun, or a new search without
      # this value, would be a choice made after seeing it, which nothing accounts for).
      scores.append((-math.inf,))
      runs.append(None)
      diverged.append(i)
      print(f'[tune] run {i + 1} diverged; scored as the worst (the curator\'s, not covered)',
            flush=True)
      continue
    recorded = accounting.PrivacyLedger.from_dict(results['privacy_ledger'])
    planned = planned_ledger(config, num_units, unit, config.noise_multiplier)
    if recorded.to_dict() != planned.to_dict():
      raise ConfigError(f'{config.workdir}: the run recorded a ledger other than the one the '
                        'guarantee was calibrated for (its data changed?)')
    rule = results['release']['selection_rule']
    scores.append(selection_lib.score(results['release']['val_metrics'], rule))
    runs.append(results)
    print(f'[tune] run {i + 1} done (the curator\'s: the number of runs is not covered)',
          flush=True)
  finished = [i for i in range(len(runs)) if runs[i] is not None]
  best = max(finished, key=lambda i: (scores[i], -i)) if finished else None
  law = _law(distribution)
  release = {
      'epsilon': epsilon, 'delta': args.delta,
      'covers': ('the selected model, its metrics and the chosen configuration: the best of K '
                 'private runs with K secret and random (Papernot & Steinke 2022, '
                 'dpjax.tuning); neither K nor the other runs are released'),
      'accounting': 'RDP (dp-accounting orders and conversion), dpjax.tuning.tuned_epsilon',
      'distribution': distribution,
      'expected_runs': tuning.expected_num_runs(distribution['distribution'], **law),
      'per_run_ledgers': [ledger.to_dict() for ledger in ledgers],
      'neighbouring_relation': ledgers[0].neighbouring_relation,
      'privacy_unit': unit,
      'search_space': space,
      'chosen': None if best is None else drawn[best],
      'noise_multiplier': None if best is None else runs[best]['privacy_ledger']['runs'][0][0],
      'release': None if best is None else _as_tuned(runs[best]['release'], epsilon, args.delta),
      'replace_one_note': ('the epsilon above is against adding or removing one unit; the '
                           'ledgers publish n (sampling_prob = batch / n), and a replace-one '
                           'epsilon of the tuned release is not computed (dp-accounting\'s RDP '
                           'accountant has none for Poisson sampling): with n known, use at '
                           'most twice the group-2 bound, or treat the guarantee as add/remove '
                           'against someone who does not know n'),
      'note': (None if best is not None else
               'K = 0 runs were drawn (Poisson): nothing is selected, and that is the release'),
  }
  out = workdir / 'release'
  if best is not None:
    model = Path(runs[best]['config']['workdir']) / 'release' / 'model.msgpack'
    if model.exists():
      out.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(model, out / 'model.msgpack')
  provenance.write_json_atomic(out / RELEASE_FILE, release)
  provenance.write_json_atomic(workdir / NOT_COVERED_FILE, {
      'note': NOT_COVERED_NOTE, 'num_runs': len(drawn), 'selected_run': best,
      'scores': scores, 'configurations': drawn,
      'diverged_runs': diverged,
      'per_run_epsilons': [r.get('epsilon') if r else None for r in runs]}, mode=0o600)
  if best is None:
    print(f'tuned release: nothing selected (K = 0); epsilon {epsilon:.4g} at delta '
          f'{args.delta:g} covers that; wrote {out / RELEASE_FILE}')
    return 0
  test = runs[best]['release']['test_metrics']
  chosen = ', '.join(f'{k}={v}' for k, v in drawn[best].items())
  auc = test.get('roc_auc')
  print(f'tuned release: epsilon {epsilon:.6g} at delta {args.delta:g} covering the search '
        f'and the choice; chosen {chosen}; test balanced accuracy '
        f'{test["balanced_accuracy"]:.3f}' + (f', ROC AUC {auc:.3f}' if auc is not None else '')
        + f'; wrote {out / RELEASE_FILE}')
  return 0


if __name__ == '__main__':
  exit_promptly_on_signals()
  sys.exit(main())
