"""``load_dataset``: the one entry point from a data folder (or demo data) to host-side splits.

Path of the data, the same for demo and real data:
folder scan (:mod:`dpjax.data.folders`) -> TFDS preparation into ArrayRecord once per
``prep_size`` (:mod:`dpjax.data.tfds_builders`, under ``<cache>/tfds``, never inside the
user's folder) -> random-access data source -> seeded stratified splits as index subsets.

Splits (``seed`` chooses them; the prepared data do not depend on it):
* pneumonia: official ``test``; ``val`` = stratified 10% of the official train folder,
  ``train`` = the other 90%; the official 16-image val folder is ``official_val``.
* aptos: stratified 70% train / 10% val / 20% test of the 3,662 labelled images.
  (The paper trained on 80%, n = 2,929, and selected models on its held-out 20%; we keep a
  separate validation split so that model selection never looks at the test split.)

Host -> device contract: ``Split.gather(indices)`` returns uint8 [k, S, S, 3] squares of side
``prep_size = round(image_size * 256 / 224)``, int32 labels and int64 stable example ids.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from dpjax.data import demo, folders, tfds_builders
from dpjax.data.folders import DataError

DATASETS = ('pneumonia', 'aptos')
PNEUMONIA_VAL_FRACTION = 0.1
APTOS_SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # train, val, test
DEMO_SEED = 0  # The demo data are one fixed data set, like the real ones; `seed` only picks splits.


def prep_size_for(image_size: int) -> int:
  """Side of the stored squares: the paper's Resize(256) -> CenterCrop(224), scaled."""
  return round(image_size * 256 / 224)


class Split:
  """One split: random access to (image, label, id) by position 0..len-1."""

  def __init__(self, name: str, source, record_indices: np.ndarray, labels: np.ndarray, ids: np.ndarray):
    self.name = name
    self._source = source
    self._record_indices = np.asarray(record_indices, np.int64)
    self.labels = np.asarray(labels, np.int32)  # All labels of the split, in position order.
    self.ids = np.asarray(ids, np.int64)  # Stable example ids, in position order.
    self.fast_decode = True  # False: decode through TFDS (same result, slower).

  def __len__(self) -> int:
    return len(self._record_indices)

  def __repr__(self) -> str:
    return f'Split({self.name!r}, {len(self)} examples, class counts {np.bincount(self.labels).tolist()})'

  def _read(self, keys: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Reads records -> (images uint8 [k,S,S,3], stored ids int64 [k]), one batched read."""
    shape = self._source.dataset_info.features['image'].shape
    images = np.empty((len(keys), *shape), np.uint8)
    stored_ids = np.empty((len(keys),), np.int64)
    raw_source = getattr(self._source, 'data_source', None)
    if not keys:
      pass
    elif self.fast_decode and raw_source is not None:
      # Fast path, about 2x faster than TFDS's generic decoding: parse the tf.Example protos
      # directly; the image is stored as raw bytes (Tensor encoding='bytes').
      for j, serialized in enumerate(raw_source.__getitems__(keys)):
        feature = tf_example_pb2.Example.FromString(serialized).features.feature
        images[j] = np.frombuffer(feature['image'].bytes_list.value[0], np.uint8).reshape(shape)
        stored_ids[j] = feature['id'].int64_list.value[0]
    else:
      for j, record in enumerate(self._source.__getitems__(keys)):
        images[j] = record['image']
        stored_ids[j] = record['id']
    return images, stored_ids

  def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Examples at positions ``indices`` -> (images uint8 [k,S,S,3], labels int32 [k], ids int64 [k])."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
      raise IndexError(f'Expected indices in [0, {len(self)}) for split {self.name!r}; '
                       f'got min {indices.min()}, max {indices.max()}')
    ids = self.ids[indices]
    images, stored_ids = self._read(self._record_indices[indices].tolist())
    if not np.array_equal(stored_ids, ids):  # Cheap guard: record order must match the metadata.
      raise DataError(f'Prepared data for split {self.name!r} are out of order; delete the prepared copy under the cache dir tfds/ and retry')
    return images, self.labels[indices], ids


@dataclasses.dataclass
class DatasetSplits:
  """Everything training needs from the data layer."""
  train: Split
  val: Split
  test: Split
  num_classes: int
  class_names: tuple[str, ...]
  prep_size: int  # Side of the stored uint8 squares (crop to image_size on device).
  image_size: int
  source: str  # 'demo' or the resolved data folder.
  is_demo: bool
  skipped: list[str]  # Files / rows skipped under skip_bad=True, with the reason.
  official_val: Split | None = None  # pneumonia: the official 16-image val folder.
  notes: list[str] = dataclasses.field(default_factory=list)  # e.g. which nested copy was used.
  prepared_dir: str = ''  # Where the ArrayRecord files are.


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
  """Positions split by class: part j gets round(fractions[j] * n_c) of each class c (j >= 1),
  part 0 the rest. Each part is sorted. Deterministic in ``seed``."""
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)  # Split choice is not private: a seeded NumPy Generator is fine.
  parts: list[list[np.ndarray]] = [[] for _ in fractions]
  for label in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == label))
    counts = [int(round(f * len(members))) for f in fractions[1:]]
    if sum(counts) > len(members):
      raise ValueError(f'Class {label} has only {len(members)} examples; cannot split by {fractions}')
    boundaries = np.cumsum([len(members) - sum(counts), *counts])[:-1]
    for part, chunk in zip(parts, np.split(members, boundaries)):
      part.append(chunk)
  return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def load_dataset(name: str, data_dir: str | os.PathLike | None, image_size: int, *, seed: int = 0,
                 skip_bad: bool = False, cache_dir: str | os.PathLike | None = None) -> DatasetSplits:
  """Loads 'pneumonia' or 'aptos' from ``data_dir`` (None or '' = built-in demo data).

  Args:
    name: 'pneumonia' or 'aptos'.
    data_dir: the Kaggle folder (see :mod:`dpjax.data.folders` for accepted layouts), or None
      for the synthetic demo set (generated once into the cache, then loaded the same way).
    image_size: side of the network input; images are stored at ``prep_size_for(image_size)``.
    seed: picks the stratified train/val(/test) split.
    skip_bad: skip undecodable images and bad CSV rows (listed in ``skipped``) instead of raising.
    cache_dir: cache root (demo data and prepared data); default $DPJAX_CACHE or ~/.cache/dpjax.

  Raises:
    DataError: missing folder, wrong layout, or a bad file / row when skip_bad is False.
  """
  if name not in DATASETS:
    raise ValueError(f'Unknown dataset {name!r}; expected one of {DATASETS}')
  if image_size < 1:
    raise ValueError(f'Expected {image_size=} >= 1')
  cache_root = Path(cache_dir).expanduser() if cache_dir else demo.default_cache_root()
  is_demo = not data_dir
  if is_demo:
    data_dir = demo.ensure_demo_data(name, cache_root, seed=DEMO_SEED)
  scan = folders.scan_folder(name, data_dir, skip_bad=skip_bad)
  prep_size = prep_size_for(image_size)

  # One prepared copy per distinct folder content: the fingerprint changes with the files.
  tfds_dir = cache_root / 'tfds' / f'{name}-{scan.fingerprint()[:16]}'
  builder_cls = tfds_builders.BUILDERS[name]
  builder = builder_cls(config=tfds_builders.prep_config(prep_size), data_dir=str(tfds_dir),
                        scan=scan, skip_bad=skip_bad)
  if not builder.is_prepared():
    logging.info('Preparing %s at %d px from %s into %s (once)', name, prep_size, scan.root, tfds_dir)
    if is_demo:  # A few seconds; TFDS's progress bars would only clutter the demo's output.
      tfds.display_progress_bar(False)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(scan.root)), file_format='array_record')
    builder = builder_cls(config=tfds_builders.prep_config(prep_size), data_dir=str(tfds_dir))
  metadata = builder.info.metadata
  skipped = list(metadata.get('skipped', []))
  if skipped and not skip_bad:  # Prepared earlier with skip_bad=True; the files are still bad.
    raise DataError(f'{skipped[0]} (and {len(skipped) - 1} more); pass skip_bad=True to skip them')
  sources = builder.as_data_source()

  def whole(split: str) -> Split:
    info = metadata['splits'][split]
    labels = np.asarray(info['labels'], np.int32)
    return Split(split, sources[split], np.arange(len(labels)), labels, np.asarray(info['ids'], np.int64))

  def subset(split: Split, name_: str, positions: np.ndarray) -> Split:
    return Split(name_, split._source, split._record_indices[positions], split.labels[positions], split.ids[positions])  # pylint: disable=protected-access

  if name == 'pneumonia':
    pool = whole('train')
    train_pos, val_pos = stratified_split(pool.labels, (1 - PNEUMONIA_VAL_FRACTION, PNEUMONIA_VAL_FRACTION), seed)
    train, val, test = subset(pool, 'train', train_pos), subset(pool, 'val', val_pos), whole('test')
    official_val = whole('official_val') if 'official_val' in metadata['splits'] else None
  else:
    pool = whole('train')
    train_pos, val_pos, test_pos = stratified_split(pool.labels, APTOS_SPLIT_FRACTIONS, seed)
    train, val, test = (subset(pool, n, p) for n, p in (('train', train_pos), ('val', val_pos), ('test', test_pos)))
    official_val = None

  return DatasetSplits(
      train=train, val=val, test=test, num_classes=len(scan.class_names), class_names=tuple(scan.class_names),
      prep_size=prep_size, image_size=image_size, source='demo' if is_demo else str(scan.root), is_demo=is_demo,
      skipped=skipped, official_val=official_val, notes=list(metadata.get('notes', [])),
      prepared_dir=str(builder.data_dir))
