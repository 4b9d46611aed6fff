"""One library, one application: dpjax/ stays light and never imports the benchmark, and no
module reads another module's private names."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ('tensorflow_datasets', 'orbax', 'matplotlib', 'tqdm', 'ml_collections', 'tensorflow',
         'torch', 'experiments', 'tensorboardX', 'tensorboard')


def _modules(folder: str) -> list[Path]:
  return sorted(p for p in (REPO / folder).rglob('*.py')
                if not p.name.endswith('_test.py') and p.name != 'conftest.py')


def test_import_dpjax_loads_none_of_the_heavy_packages():
  code = ('import sys, dpjax; print(" ".join(sorted({m.split(".")[0] for m in sys.modules})))')
  loaded = set(subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.split())
  assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def _imported_modules(tree: ast.AST) -> set[str]:
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
  return names


def test_no_library_module_imports_the_application():
  offenders = [str(path.relative_to(REPO)) for path in _modules('dpjax')
               if any(name.split('.')[0] == 'experiments'
                      for name in _imported_modules(ast.parse(path.read_text())))]
  assert not offenders


def test_no_module_reads_another_modules_private_names():
  offenders = []
  for path in _modules('dpjax') + _modules('experiments'):
    tree = ast.parse(path.read_text())
    aliases = set()  # Names bound to imported modules of this project.
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        aliases.update((a.asname or a.name).split('.')[0] for a in node.names
                       if a.name.split('.')[0] in ('dpjax', 'experiments'))
      elif isinstance(node, ast.ImportFrom) and (node.module or '').split('.')[0] in (
          'dpjax', 'experiments'):
        aliases.update(a.asname or a.name for a in node.names)
        offenders += [f'{path.relative_to(REPO)}: from {node.module} import {a.name}'
                      for a in node.names if a.name.startswith('_')]
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and node.attr.startswith('_')
          and not node.attr.startswith('__') and isinstance(node.value, ast.Name)
          and node.value.id in aliases):
        offenders.append(f'{path.relative_to(REPO)}:{node.lineno}: {node.value.id}.{node.attr}')
  assert not offenders, offenders


def test_the_core_package_installs_only_what_import_dpjax_needs():
  import tomllib
  project = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']
  core = {d.split('>')[0].split('=')[0].split('[')[0] for d in project['dependencies']}
  assert core == {'jax', 'flax', 'optax', 'dp-accounting', 'numpy', 'scipy'}, core
  extras = project['optional-dependencies']
  assert {'data', 'scatternet', 'experiments', 'test', 'tpu', 'cuda12', 'cuda13'} <= set(extras)
  assert 'dpjax[experiments]' in extras['test']  # The tests run the benchmark too.
  assert (REPO / 'dpjax' / 'py.typed').exists()  # Type checkers read dpjax's annotations.
  readme = (REPO / 'README.md').read_text()
  assert "pip install -e '.[experiments]' && python -m experiments.run" in readme
