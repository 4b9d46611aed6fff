"""Data layer: demo data, Kaggle folder scanning, TFDS preparation, loading, on-device preprocessing.

Import the submodules directly (``from dpjax.data import datasets, preprocess``); this package
imports nothing itself, so ``preprocess`` does not pull in tensorflow_datasets.
"""
