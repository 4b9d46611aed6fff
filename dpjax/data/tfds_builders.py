"""TFDS builders for the two data sets, prepared as ArrayRecord for random access, no TensorFlow.

``chest_xray_pneumonia`` and ``aptos2019`` are manual-download builders: point
``download_config.manual_dir`` at the Kaggle folder (any layout :mod:`dpjax.data.folders`
accepts). Images are decoded, resized (shorter side to ``prep_size``, bilinear) and centre
cropped to ``prep_size`` squares once, at preparation, and stored as raw uint8 bytes
(``Tensor(..., encoding='bytes')``: about 8x faster to read back than the default encoding;
``tfds.features.Image`` would need TensorFlow). One BuilderConfig per ``prep_size``
(name ``f'{prep_size}px'``; 256 serves the paper's 224 crop).

Each record: ``image`` uint8 [S, S, 3], ``label`` int64, ``id`` int64 (stable example id).

Prepared splits are the data as published, in a fixed order (shuffling disabled):
pneumonia ``train`` (5,216), ``official_val`` (16), ``test`` (624); APTOS ``train`` (all 3,662
labelled images). The seeded stratified splits that training uses (pneumonia validation =
10% of train; APTOS 70/10/20 train/val/test) are index subsets chosen at load time by
:func:`dpjax.data.datasets.load_dataset`, so changing the seed never re-prepares the data.
The labels and ids of every prepared split, and the skipped files, are stored in the
dataset's metadata so loading does not have to read the images.

Verified with tensorflow-datasets 4.9.10 and TensorFlow absent: ``download_and_prepare(
file_format='array_record')`` and ``as_data_source()`` both work. ``DatasetInfo`` is built
directly rather than via ``dataset_info_from_configs`` (which reads README/CITATIONS files
from this package's folder), and ``code_path = None`` (TFDS's default looks for a checksums
file next to the module and, for a module inside a package, imports ``importlib_resources``,
which TFDS 4.9.10 does not declare as a dependency).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import os
from concurrent import futures
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from dpjax.data import folders

_DEFAULT_PREP_SIZES = (256, 73, 37)  # For image_size 224 (paper), 64 (demo) and 32 (tests).
_DECODE_CHUNK = 64


@dataclasses.dataclass
class PrepConfig(tfds.core.BuilderConfig):
  """Images are stored as prep_size x prep_size squares."""
  prep_size: int = 256


@functools.cache  # One instance per size: TFDS rejects an equal-named config that is another object.
def prep_config(prep_size: int) -> PrepConfig:
  """The BuilderConfig for one preparation size, named f'{prep_size}px'."""
  if prep_size < 1:
    raise ValueError(f'Expected {prep_size=} >= 1')
  return PrepConfig(name=f'{prep_size}px', prep_size=prep_size,
                    description=f'Shorter side resized to {prep_size} px, centre crop {prep_size}x{prep_size}.')


class _LocalDatasetInfo(tfds.core.DatasetInfo):
  """TFDS's DatasetInfo, minus the look-up of precomputed metadata on TFDS's public bucket."""

  def initialize_from_bucket(self) -> None:
    # These datasets are never on gs://tfds-data, and TFDS's version makes a temporary folder
    # before looking and never removes it: one empty /tmp/tmp*tfds per preparation.
    return


class _FolderBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared logic: scan the manual folder, decode in threads, record labels/ids/skips."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [prep_config(s) for s in _DEFAULT_PREP_SIZES]
  DATASET_NAME = ''  # 'pneumonia' or 'aptos', as in dpjax.data.folders
  CLASS_NAMES: tuple[str, ...] = ()
  DESCRIPTION = ''
  HOMEPAGE = ''
  # No checksums file to find (manual download). Also avoids TFDS's lookup of the package
  # path, which imports `importlib_resources`, a package missing from this environment.
  code_path = None

  def __init__(self, *, skip_bad: bool = False, scan: folders.FolderScan | None = None, **kwargs):
    """Args beyond TFDS's: skip_bad (skip undecodable images, listed in metadata['skipped']);
    scan (an existing FolderScan of the manual folder, to avoid scanning twice)."""
    self._skip_bad = skip_bad
    self._scan = scan
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.prep_size
    return _LocalDatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8, encoding='bytes'),
            'label': tfds.features.ClassLabel(names=list(self.CLASS_NAMES)),
            'id': tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=('image', 'label'),
        homepage=self.HOMEPAGE,
        disable_shuffling=True,  # Record i of a split is listing entry i: labels come from metadata.
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    scan = self._scan or folders.scan_folder(self.DATASET_NAME, dl_manager.manual_dir, skip_bad=self._skip_bad)
    metadata = self.info.metadata
    metadata['source'] = str(scan.root)
    metadata['notes'] = list(scan.notes)
    metadata['skipped'] = list(scan.skipped)
    metadata['splits'] = {}
    return {split: self._generate_examples(split, records)
            for split, records in self._prepared_splits(scan).items()}

  @abc.abstractmethod
  def _prepared_splits(self, scan: folders.FolderScan) -> dict[str, list[folders.ImageRecord]]:
    """The prepared splits: name -> records in listing order."""

  def _generate_examples(self, split: str, records: list[folders.ImageRecord]) -> Iterator:
    size = self.builder_config.prep_size
    labels, ids = [], []
    self.info.metadata['splits'][split] = {'labels': labels, 'ids': ids}

    def decode(record):
      try:
        return folders.load_square_image(record.path, size)
      except folders.DataError as e:  # Skippable: names the file, and no flag (the CLI adds its own hint).
        if not self._skip_bad:
          raise
        return e

    # PIL releases the GIL while decoding and resizing: threads use all cores. Chunks bound memory.
    with futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
      for start in range(0, len(records), _DECODE_CHUNK):
        chunk = records[start:start + _DECODE_CHUNK]
        for record, image in zip(chunk, pool.map(decode, chunk)):
          if isinstance(image, folders.DataError):
            self.info.metadata['skipped'].append(str(image))
            continue
          labels.append(record.label)
          ids.append(record.example_id)
          # Keys sort in listing order; with shuffling disabled, record order = listing order.
          yield f'{len(ids) - 1:08d}', {'image': image, 'label': record.label, 'id': record.example_id}


class ChestXrayPneumonia(_FolderBuilder):
  """Kermany et al. pediatric chest X-rays: NORMAL vs PNEUMONIA (Kaggle chest-xray-pneumonia)."""

  name = 'chest_xray_pneumonia'
  DATASET_NAME = 'pneumonia'
  CLASS_NAMES = folders.PNEUMONIA_CLASS_NAMES
  DESCRIPTION = ('Pediatric frontal chest X-rays (Kermany et al. 2018), labels NORMAL (0) / PNEUMONIA (1). '
                 'Splits: official train (5,216), official_val (16), test (624).')
  HOMEPAGE = 'https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia (archive.zip),
  unzip it, and pass the folder that contains chest_xray/ (or chest_xray/ itself) as manual_dir.
  The zip's nested duplicate chest_xray/chest_xray/ and __MACOSX/ are handled.
  """

  def _prepared_splits(self, scan):
    splits = {'train': scan.splits['train'], 'test': scan.splits['test']}
    if scan.splits.get('official_val'):
      splits['official_val'] = scan.splits['official_val']
    return splits


class Aptos2019(_FolderBuilder):
  """APTOS 2019 Blindness Detection: diabetic retinopathy grade 0-4 of colour fundus photographs."""

  name = 'aptos2019'
  DATASET_NAME = 'aptos'
  CLASS_NAMES = folders.APTOS_CLASS_NAMES
  DESCRIPTION = ('APTOS 2019 fundus photographs with diabetic retinopathy grades 0-4. '
                 "Split 'train' holds all 3,662 labelled images (the Kaggle test set has no labels).")
  HOMEPAGE = 'https://www.kaggle.com/competitions/aptos2019-blindness-detection'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download the competition data from
  https://www.kaggle.com/competitions/aptos2019-blindness-detection/data, unzip it, and pass the
  folder that contains train.csv and train_images/ as manual_dir.
  """

  def _prepared_splits(self, scan):
    return {'train': scan.splits['labelled']}


BUILDERS = {'pneumonia': ChestXrayPneumonia, 'aptos': Aptos2019}
