"""The dp_sgd example of the README and docs/USING_DP_SGD.md runs as written."""

import contextlib
import io
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = '<!-- dp_sgd example -->'


def _example(path: Path) -> str:
  text = path.read_text()
  block = re.search(re.escape(MARKER) + r'\s*```python\n(.*?)```', text, re.DOTALL)
  assert block, f'no example block in {path}'
  return block.group(1)


def test_readme_dp_sgd_example_trains_with_the_guarantee_it_prints():
  code = _example(REPO / 'README.md')
  assert code == _example(REPO / 'docs' / 'USING_DP_SGD.md')  # One example, shown twice.
  assert len([line for line in code.splitlines() if line.strip()]) <= 40
  namespace, out = {}, io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  assert namespace['epsilon'] <= 2.0 + 1e-6  # Calibrated for the 200 steps that ran.
  assert namespace['ledger'].num_steps == 200
  assert namespace['accuracy'] > 0.75  # It learns (a statistic of training data: not covered).
  assert 'DP' in out.getvalue()
