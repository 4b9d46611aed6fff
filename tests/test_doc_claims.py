"""What the README and docs/GUARANTEES.md claim matches what the mechanisms protect."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / 'README.md', REPO / 'docs' / 'GUARANTEES.md']


def _row(text: str, start: str) -> str:
  (row,) = [line for line in text.splitlines() if line.startswith(start)]
  return row


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: p.name)
def test_ldp_is_not_claimed_to_protect_membership_or_labels(doc):
  # LDP noises the pixels only; labels and who is in the training set are used exactly.
  row = _row(doc.read_text(), '| `ldp`, pneumonia |')
  assert 'hence the model' not in row
  assert 'membership' in row and 'NOT protected' in row


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: p.name)
def test_aptos_rows_say_a_patient_has_two_eyes(doc):
  text = doc.read_text()
  for start in ('| `dpsgd`, APTOS', '| `ldp`, APTOS |'):
    row = _row(text, start)
    assert 'both eyes' in row and '2x' in row, row


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: p.name)
def test_the_split_is_drawn_from_split_seed(doc):
  text = ' '.join(doc.read_text().split())
  assert 'keyed hash of `--split_seed`' in text and 'keyed hash of `--seed`' not in text
