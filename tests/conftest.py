"""Shared fixtures: tiny data sets in the real on-disk layouts, made by the demo generator."""

import pytest

from experiments import demo_data as demo

TINY_COUNTS = {
    'pneumonia': {'train': [16, 28], 'val': [2, 2], 'test': [6, 10]},
    'aptos': {'train': [20, 6, 12, 4, 4]},
}


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
  """{dataset: folder} of tiny data sets written in the Kaggle layouts."""
  root = tmp_path_factory.mktemp('tiny_data')
  folders = {}
  for dataset, counts in TINY_COUNTS.items():
    folders[dataset] = root / dataset
    demo.write_demo_data(dataset, folders[dataset], seed=0, class_counts=counts)
  return folders


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
  """Prepared datasets go to a per-session temporary cache, never the user's."""
  monkeypatch.setenv('DPJAX_CACHE', str(tmp_path_factory.getbasetemp() / 'cache'))
