"""Tables and figures of an experiment grid, beside the paper's published numbers.

Two sets: the curator's (`table.md`, `table.csv`, `learning_curves.png`, `privacy_utility.png`
in the grid's folder), which hold statistics of the training data outside the mechanism
(train accuracy, membership-attack scores, wall times), and the publishable one in `release/`,
built from each run's release alone (`experiments.results.public_release`): validation and test
metrics of the released models, their epsilons and delta, and the settings.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from experiments.published import PUBLISHED_ACCURACY

# The paper's cells, in table order: (mechanism, beta); the non-private cell has no beta.
CELLS = (('none', None), ('ldp', 1.0), ('ldp', 2.0), ('ldp', 4.0),
         ('dpsgd', 1.0), ('dpsgd', 2.0), ('dpsgd', 4.0))


def cell_name(mech: str, beta: float | None) -> str:
  """'original' for the non-private cell, else e.g. 'ldp_b1', 'dpsgd_b4'."""
  return 'original' if mech == 'none' else f'{mech}_b{beta:g}'


CELL_ORDER = tuple(cell_name(mech, beta) for mech, beta in CELLS)
MECH_ORDER = ('none', 'ldp', 'dpsgd')


def cells_for(dpsgd_epsilons: list[float] | None = None) -> tuple:
  """The grid's cells; with `dpsgd_epsilons`, the DP-SGD cells target those epsilons instead
  of the paper's beta = 1, 2, 4 (DP-SGD's beta is 1 / target epsilon)."""
  if not dpsgd_epsilons:
    return CELLS
  return tuple(c for c in CELLS if c[0] != 'dpsgd') + tuple(
      ('dpsgd', 1.0 / eps) for eps in sorted(dpsgd_epsilons, reverse=True))


def cell_of(result: dict[str, Any]) -> str:
  """The cell name of one run's results."""
  return cell_name(result['mech'], result['beta'])


def recipe_of(result: dict[str, Any]) -> str:
  return result['config'].get('recipe', 'paper')


def arch_of(result: dict[str, Any]) -> str:
  return result['config'].get('arch', 'resnet18')


def label_variants(rows: list[dict[str, Any]]) -> None:
  """Sets each row's `variant`, the column it belongs to: its recipe, with its architecture
  when the rows hold several (`experiments.grid --archs`)."""
  several = len({r['arch'] for r in rows}) > 1
  for r in rows:
    r['variant'] = f'{r["arch"]} ({r["recipe"]})' if several else r['recipe']


def _cell_sort_key(result: dict[str, Any]):
  return MECH_ORDER.index(result['mech']), result['beta'] if result['mech'] != 'none' else 0


def _mean_std(values: list[float]) -> tuple[float, float]:
  values = [float(v) for v in values]
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _pct(mean: float, std: float, n: int) -> str:
  return f'{100 * mean:.2f}' + (f' ± {100 * std:.2f}' if n > 1 else '')


def _as_float(value) -> float:
  return float(value) if value is not None else float('nan')


def guarantee_text(result: dict[str, Any]) -> str:
  """The epsilon a cell really has, short enough for a table."""
  eps = _as_float(result.get('epsilon'))
  if result['mech'] == 'none':
    return 'none'
  if 'epsilon_if_seed_secret' in result:  # Before the LDP branch: its epsilons are void too.
    return (f'none: --noise_seed published (else {_as_float(result["epsilon_if_seed_secret"]):.3g}, '
            f'δ={result["delta"]:g})')
  if result['mech'] == 'ldp':
    ldp = result['ldp']
    if ldp['per_image_epsilon'] is None:
      return 'none (brightness shift: no image-level DP)'
    pixel = 'grey pixel' if ldp.get('grayscale') else 'pixel value'
    per_patient = ', k x that/patient of k images' if 'per_patient_epsilon' in ldp else ''
    return (f'{ldp["per_pixel_epsilon"]:g}/{pixel}, {ldp["per_image_epsilon"]:.3g}/image'
            f'{per_patient} (local, pure)')
  if math.isinf(eps):
    return 'none (BatchNorm in train mode)'
  text = f'{eps:.3g} (δ={result["delta"]:g}, {result["neighbouring_relation"]}'
  replace_one = result.get('epsilon_replace_one')
  if result['neighbouring_relation'] != 'replace_one' and replace_one is not None:
    # The number of training units is published: replace-one is what holds with it known.
    text += f'; {_as_float(replace_one):.3g} replace-one'
  return text + ')'


def _groups(results: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
  """Runs by (dataset, arch, recipe, cell), in table order."""
  groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
  for r in sorted(results, key=lambda r: (r['dataset'], arch_of(r), recipe_of(r),
                                          _cell_sort_key(r))):
    groups[(r['dataset'], arch_of(r), recipe_of(r), cell_of(r))].append(r)
  return groups


def _covered_row(key: tuple, runs: list[dict[str, Any]]) -> dict[str, Any]:
  """The columns of one row that the runs' releases hold: settings, guarantee, validation and
  test metrics of the released models. Reads only what `public_release` keeps."""
  dataset, arch, recipe, cell = key
  row: dict[str, Any] = {'dataset': dataset, 'arch': arch, 'recipe': recipe, 'cell': cell,
                         'seeds': len(runs),
                         'protocol': runs[0]['config'].get('protocol', 'sound'),
                         'data': runs[0]['data'], 'guarantee': guarantee_text(runs[0]),
                         'target_epsilon': runs[0].get('target_epsilon')}
  for split in ('val', 'test'):
    row[f'{split}_mean'], row[f'{split}_std'] = _mean_std(
        [r['release'][f'{split}_accuracy'] for r in runs])
  metrics = [r['release']['test_metrics'] for r in runs]
  row['balanced_mean'], row['balanced_std'] = _mean_std([m['balanced_accuracy'] for m in metrics])
  name = 'roc_auc' if 'roc_auc' in metrics[0] else 'quadratic_weighted_kappa'
  row['secondary_metric'] = name
  row['secondary_mean'], row['secondary_std'] = _mean_std([m[name] for m in metrics])
  row['num_classes'] = len(metrics[0]['per_class_recall'])
  # Two classes: the released decision rule is the model with its threshold chosen on
  # validation (`operating_point`); its test balanced accuracy beside the argmax's.
  points = [r['release'].get('operating_point') for r in runs]
  if all(points):
    row['threshold_balanced_mean'], row['threshold_balanced_std'] = _mean_std(
        [p['test']['balanced_accuracy'] for p in points])
  row['epsilon'] = _as_float(runs[0].get('epsilon'))
  row['epsilon_replace_one'] = _as_float(runs[0].get('epsilon_replace_one'))
  row['delta'] = runs[0].get('delta')
  # The non-private baseline protects no unit: '-' in the tables, not 'None'.
  row['privacy_unit'] = runs[0].get('privacy_unit') or '-'
  row['majority_baseline'] = runs[0]['release']['majority_baseline']
  row['published_test'] = PUBLISHED_ACCURACY.get((dataset, 'test'), {}).get(cell)
  if 'epsilon_claimed_by_paper_method' in runs[0]:
    row['epsilon_claimed'] = _as_float(runs[0]['epsilon_claimed_by_paper_method'])
  return row


def published_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The publishable table's rows: built from each run's release alone (results.json without
  its private fields), so no statistic of the training data outside the mechanism gets in."""
  from experiments.results import public_release  # Deferred: imports JAX.
  rows = [_covered_row(key, runs)
          for key, runs in _groups([public_release(r) for r in results]).items()]
  label_variants(rows)
  return rows


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per (dataset, recipe, cell): means and stds over seeds, and the published numbers;
  the curator's rows: `published_rows`' columns and the not-covered ones."""
  rows = []
  for key, runs in _groups(results).items():
    row = _covered_row(key, runs)
    # train_*, mia_* and the wall time: statistics of the training data outside the mechanism
    # (not covered; write_csv marks their columns).
    row['train_mean'], row['train_std'] = _mean_std(
        [r['not_covered']['train_accuracy'] for r in runs])
    row['published_train'] = PUBLISHED_ACCURACY.get((key[0], 'train'), {}).get(key[3])
    if all('audit' in r['not_covered'] for r in runs):
      attacks = [r['not_covered']['audit']['membership']['loss_threshold'] for r in runs]
      row['mia_auc'], _ = _mean_std([a['auc'] for a in attacks])
      row['mia_epsilon_lower_bound'] = max(a['epsilon_lower_bound'] for a in attacks)
      # Beside it, the most a perfect attack could have shown in that run (absent in old runs).
      strongest = max(attacks, key=lambda a: a['epsilon_lower_bound'])
      if 'epsilon_lower_bound_max' in strongest:
        row['mia_epsilon_lower_bound_max'] = strongest['epsilon_lower_bound_max']
    row['wall_time_s'] = float(np.mean([r.get('wall_time_s', float('nan')) for r in runs]))
    rows.append(row)
  label_variants(rows)
  return rows


NOT_COVERED_SUFFIX = '_not_covered'
RELEASE_DIR = 'release'  # The grid's publishable tables and figures, as a run's release/.


def _csv_name(field: str) -> str:
  """Column name: statistics of training data outside the mechanism say so in their name."""
  return (field + NOT_COVERED_SUFFIX if field.startswith(('train_', 'mia_', 'wall_time'))
          else field)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
  # First-seen order over all rows: the same header whatever the rows or the hash seed.
  fields = list(dict.fromkeys(k for row in rows for k in row))
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=[_csv_name(k) for k in fields])
    writer.writeheader()
    writer.writerows({_csv_name(k): v for k, v in row.items()} for row in rows)


def _audit_text(row: dict[str, Any]) -> str:
  if 'mia_auc' not in row:
    return '-'
  at_most = (f' (max {row["mia_epsilon_lower_bound_max"]:.2f})'
             if 'mia_epsilon_lower_bound_max' in row else '')
  return f'{row["mia_auc"]:.3f} / {row["mia_epsilon_lower_bound"]:.2f}{at_most}'


CURATOR_TABLE_NOTE = ("The curator's table: it holds statistics of the training data outside "
                      'the mechanism (not covered); do not publish it. The publishable one is '
                      'release/table.md.')
PUBLISHABLE_TABLE_NOTE = ('Publishable: every column is a setting, a guarantee, or a validation '
                          'or test metric of the released models (each run\'s release/ alone).')
_COMPOSITION_NOTE = ("Each cell's epsilon is its own: the cells are trained on the same data, "
                     'so publishing several of them composes (their epsilons add up, and the '
                     'non-private cell has none). So does each seed: a row averaging s seeds '
                     'publishes s runs, s times its epsilon. Choosing a recipe or cell from this '
                     'table uses the test data and is not accounted for (Papernot and Steinke '
                     '2022).')


def markdown_table(rows: list[dict[str, Any]], publishable: bool = False) -> str:
  """The curator's table of `aggregate` rows, or with ``publishable`` the table of
  `published_rows` (no column computed from training examples outside the mechanism)."""
  lines = [PUBLISHABLE_TABLE_NOTE if publishable else CURATOR_TABLE_NOTE, '']
  for dataset in sorted({r['dataset'] for r in rows}):
    part = [r for r in rows if r['dataset'] == dataset]
    secondary = 'ROC AUC' if part[0]['secondary_metric'] == 'roc_auc' else 'QW kappa'
    lines += [f'### {dataset} ({part[0]["protocol"]} protocol, {part[0]["seeds"]} seed(s), '
              f'data: {part[0]["data"]})', '',
              f'Majority-class test accuracy: {100 * part[0]["majority_baseline"]:.2f}%', '']
    # Two classes: the balanced accuracy of the released decision rule (the threshold chosen
    # on validation) beside the argmax's, which a shift of the class prior moves.
    threshold = any('threshold_balanced_mean' in r for r in part)
    threshold_head = ' test balanced acc % at val threshold |' if threshold else ''
    if publishable:
      lines += [f'| cell | recipe | guarantee | unit | val acc % | test acc % | paper test | '
                f'test balanced acc % |{threshold_head} test {secondary} |',
                '|---|---|---|---|---|---|---|---|' + '---|' * (1 + threshold)]
    else:
      lines += [f'| cell | recipe | guarantee | unit | train acc % (not covered) | test acc % | '
                f'paper train | paper test | test balanced acc % |{threshold_head} '
                f'test {secondary} | MIA AUC / empirical eps >= (attainable max) (not covered) | '
                'wall s (not covered) |',
                '|---|---|---|---|---|---|---|---|---|---|---|' + '---|' * (1 + threshold)]
    for r in part:
      paper_test = f'{r["published_test"]:.2f}' if r['published_test'] is not None else '-'
      guarantee = r['guarantee'] + (f'; paper method would claim {r["epsilon_claimed"]:.3g}'
                                    if 'epsilon_claimed' in r and r['cell'].startswith('dpsgd') else '')
      test = _pct(r['test_mean'], r['test_std'], r['seeds'])
      balanced = _pct(r['balanced_mean'], r['balanced_std'], r['seeds'])
      if threshold:
        balanced += ' | ' + (_pct(r['threshold_balanced_mean'], r['threshold_balanced_std'],
                                  r['seeds']) if 'threshold_balanced_mean' in r else '-')
      second = f'{r["secondary_mean"]:.3f}' + (f' ± {r["secondary_std"]:.3f}'
                                               if r['seeds'] > 1 else '')
      if publishable:
        lines.append(f'| {r["cell"]} | {r["variant"]} | {guarantee} | {r["privacy_unit"]} | '
                     f'{_pct(r["val_mean"], r["val_std"], r["seeds"])} | {test} | {paper_test} | '
                     f'{balanced} | {second} |')
        continue
      paper_train = f'{r["published_train"]:.2f}' if r['published_train'] is not None else '-'
      lines.append(f'| {r["cell"]} | {r["variant"]} | {guarantee} | {r["privacy_unit"]} | '
                   f'{_pct(r["train_mean"], r["train_std"], r["seeds"])} '
                   f'| {test} | {paper_train} | {paper_test} | {balanced} | '
                   f'{second} | {_audit_text(r)} | {r["wall_time_s"]:.0f} |')
    lines.append('')
    lines += recipe_comparison(part, secondary)
  if not publishable:
    lines.append('Train accuracy, the membership attack and the wall time (it depends on the '
                 'data size and the sampled batches) are computed from training examples '
                 'outside the mechanism: they are not covered by the guarantee. '
                 + _COMPOSITION_NOTE)
  else:
    lines.append(_COMPOSITION_NOTE)
  if any(r['data'] == 'demo' for r in rows):
    lines.append('SYNTHETIC DEMO DATA: these numbers say nothing about real medical images; '
                 'the paper columns are the paper\'s real-data results.')
  return '\n'.join(lines) + '\n'


def recipe_comparison(part: list[dict[str, Any]], secondary: str) -> list[str]:
  """The recipes side by side at the same target epsilon (mean ± std over seeds)."""
  recipes = sorted({r['variant'] for r in part}, key=lambda n: (n != 'paper', n))
  if len(recipes) < 2:
    return []
  by_cell = defaultdict(dict)
  for r in part:
    by_cell[r['cell']][r['variant']] = r
  header = ['cell', 'target epsilon'] + [f'{name} {what}' for what in
                                         ('test acc %', 'balanced acc %', secondary)
                                         for name in recipes]
  lines = ['Recipes at the same epsilon (test split, mean ± std over seeds):', '',
           '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for cell, runs in by_cell.items():
    if set(runs) != set(recipes):
      continue
    target = next(iter(runs.values())).get('target_epsilon')
    values = [_pct(runs[n]['test_mean'], runs[n]['test_std'], runs[n]['seeds']) for n in recipes]
    values += [_pct(runs[n]['balanced_mean'], runs[n]['balanced_std'], runs[n]['seeds'])
               for n in recipes]
    values += [f'{runs[n]["secondary_mean"]:.3f} ± {runs[n]["secondary_std"]:.3f}'
               for n in recipes]
    lines.append(f'| {cell} | {"-" if target is None else f"{target:g}"} | ' + ' | '.join(values)
                 + ' |')
  return lines + ['']


def plot_learning_curves(results: list[dict[str, Any]], path: Path, train: bool = True) -> None:
  """Validation (solid) and running train (dashed, not covered) accuracy per epoch: Figure 3.
  Without ``train``, validation only, read from the releases (publishable)."""
  fig = learning_curves_figure(results, train)  # Chooses the Agg backend first.
  import matplotlib.pyplot as plt
  fig.savefig(path, dpi=110)
  plt.close(fig)


def learning_curves_figure(results: list[dict[str, Any]], train: bool = True):
  """The figure of `plot_learning_curves` (the caller closes it); epochs are whole ticks."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator
  datasets = sorted({r['dataset'] for r in results})
  fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.5), squeeze=False)
  for ax, dataset in zip(axes[0], datasets):
    by_cell: dict[str, list] = defaultdict(list)
    for r in sorted(results, key=_cell_sort_key):
      if r['dataset'] == dataset:
        # Without train, the not-covered histories are never read.
        uncovered = r['not_covered']['history'] if train else r['release']['history']
        by_cell[f'{cell_of(r)} {recipe_of(r)}' + ('' if arch_of(r) == 'resnet18' else f' {arch_of(r)}')].append(list(zip(r['release']['history'],
                                            uncovered)))
    for i, cell in enumerate(by_cell):
      histories = by_cell[cell]
      epochs = min(len(h) for h in histories)
      x = np.arange(1, epochs + 1)
      val = np.mean([[v['val_accuracy'] for v, _ in h[:epochs]] for h in histories], axis=0)
      color = f'C{i}'
      ax.plot(x, 100 * val, '-o', color=color, label=f'{cell} val', markersize=3)
      if train:
        tr = np.mean([[t['train_accuracy'] for _, t in h[:epochs]] for h in histories], axis=0)
        ax.plot(x, 100 * tr, '--', color=color, alpha=0.6)
    title = ('accuracy vs epoch (solid val, dashed train: not covered)' if train
             else 'validation accuracy vs epoch')
    ax.set(title=f'{dataset}: {title}', xlabel='epoch', ylabel='accuracy %')
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # No epoch 1.2 or 1.4.
    ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def plot_privacy_utility(rows: list[dict[str, Any]], path: Path) -> None:
  """`privacy_utility_figure(rows)` as a PNG at `path`."""
  import matplotlib.pyplot as plt
  fig = privacy_utility_figure(rows)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def privacy_utility_figure(rows: list[dict[str, Any]]):
  """Test balanced accuracy and ROC AUC (or QW kappa) against the epsilon each cell really has.

  Not accuracy alone: a model at the majority class scores the class prior in accuracy (62.5%
  on the pneumonia test split) and nothing in balanced accuracy. With two classes the balanced
  accuracy at the threshold chosen on validation is drawn beside the argmax's (dotted). Each
  variant keeps one colour in every panel, its non-private result a dashed line of that colour.
  """
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from matplotlib import ticker
  datasets = sorted({r['dataset'] for r in rows})
  variants = sorted({r['variant'] for r in rows})
  colour = {v: f'C{i % 10}' for i, v in enumerate(variants)}
  fig, axes = plt.subplots(len(datasets), 2, figsize=(16, 4.5 * len(datasets)), squeeze=False)
  for ax_row, dataset in zip(axes, datasets):
    part = [r for r in rows if r['dataset'] == dataset]
    secondary = part[0]['secondary_metric']
    secondary_name = 'ROC AUC' if secondary == 'roc_auc' else 'QW kappa'
    # Ticks at the targets of the cells drawn: the epsilons reached differ in the 5th digit.
    epsilons = sorted({r['target_epsilon'] or r['epsilon'] for r in part
                       if r['cell'].startswith(('dpsgd', 'ldp')) and math.isfinite(r['epsilon'])})
    for ax, (key, name, scale) in zip(ax_row, (('balanced', 'balanced accuracy %', 100),
                                               ('secondary', secondary_name, 1))):
      series = [(key, '-', '')]
      if key == 'balanced':
        series.append(('threshold_balanced', ':', ' at val threshold'))
      for variant in variants:
        for mech, marker in (('dpsgd', 'o'), ('ldp', 's')):
          for field, style, suffix in series:
            pts = [(r['epsilon'], r[f'{field}_mean'], r[f'{field}_std']) for r in part
                   if r['variant'] == variant and r['cell'].startswith(mech)
                   and math.isfinite(r['epsilon']) and f'{field}_mean' in r]
            if not pts:
              continue
            eps, mean, std = map(np.array, zip(*sorted(pts)))
            label = 'DP-SGD' if mech == 'dpsgd' else 'LDP per-image eps'
            ax.errorbar(eps, scale * mean, yerr=scale * std, marker=marker, capsize=3,
                        color=colour[variant], ls=style, label=f'{variant}, {label}{suffix}')
        for r in part:
          if r['cell'] == 'original' and r['variant'] == variant:
            ax.axhline(scale * r[f'{key}_mean'], ls='--', lw=0.8, color=colour[variant],
                       label=f'{variant}, non-private')
      # A constant prediction: balanced accuracy 1/classes, ROC AUC 0.5, kappa 0.
      classes = part[0].get('num_classes', 2)
      chance = 100 / classes if key == 'balanced' else (0.5 if secondary == 'roc_auc' else 0.0)
      ax.axhline(chance, color='gray', ls=':', label='a constant prediction')
      ax.set(xscale='log', title=f'{dataset}: test {name} vs epsilon', xlabel='epsilon',
             ylabel=f'test {name}')
      if epsilons:
        ax.xaxis.set_major_locator(ticker.FixedLocator(epsilons))
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter('%g'))
        ax.xaxis.set_minor_locator(ticker.NullLocator())
      ax.legend(fontsize=6, loc='upper left', bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  return fig


def write_reports(results: list[dict[str, Any]], out: Path) -> list[Path]:
  """The curator's tables and figures in ``out``, the publishable ones in ``out/release``."""
  out = Path(out)
  (out / RELEASE_DIR).mkdir(parents=True, exist_ok=True)
  rows = aggregate(results)
  paths = [out / 'table.md', out / 'table.csv', out / 'learning_curves.png',
           out / 'privacy_utility.png']
  paths[0].write_text(markdown_table(rows))
  write_csv(rows, paths[1])
  plot_learning_curves(results, paths[2])
  plot_privacy_utility(rows, paths[3])
  # From the releases alone: what the guarantee covers, and the settings.
  public = published_rows(results)
  from experiments.results import public_release  # Deferred: imports JAX.
  released = [public_release(r) for r in results]
  published = [out / RELEASE_DIR / name for name in ('table.md', 'table.csv',
                                                     'learning_curves.png', 'privacy_utility.png')]
  published[0].write_text(markdown_table(public, publishable=True))
  write_csv(public, published[1])
  plot_learning_curves(released, published[2], train=False)
  plot_privacy_utility(public, published[3])
  return paths + published
