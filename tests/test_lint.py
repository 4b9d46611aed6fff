"""The linter configuration in pyproject.toml ([tool.ruff]) holds for the whole tree."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
  ruff = shutil.which('ruff')
  if ruff is None:
    pytest.fail('ruff is not installed: pip install -e ".[test]" installs it')
  proc = subprocess.run([ruff, 'check', '--no-cache', str(REPO)], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:]
