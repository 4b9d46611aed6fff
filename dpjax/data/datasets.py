"""``load_dataset``: the one entry point from a data folder to host-side splits.

Path of the data:
folder scan (:mod:`dpjax.data.folders`) -> TFDS preparation into ArrayRecord once per
``prep_size`` (:mod:`dpjax.data.tfds_builders`, under ``<cache>/tfds``, never inside the
user's folder) -> random-access data source -> per-unit hashed splits as index subsets.

Splits (``seed`` chooses them; the prepared data do not depend on it). Each privacy unit's
split is decided by a keyed hash of (``seed``, that unit's stable identity) alone
(:func:`unit_split_uniform`), never by a permutation of the whole data set: the seed is
published, and a neighbouring data set (one patient / image more or less) must change only
that unit's own assignment, or the released validation metrics would tell the two data sets
apart. Split sizes are therefore binomial: about, not exactly, the fractions below, per class
in expectation.
* pneumonia: official ``test``; ``val`` = about 10% of the official train folder's patients,
  drawn BY PATIENT (:func:`stratified_group_split`, keyed by the patient name: no patient has
  images in both train and val); ``train`` = the rest; the official 16-image val folder is
  ``official_val``. The official train/test folders are kept exactly as Kaggle ships them.
  Patients come from the file names (:func:`dpjax.data.folders.pneumonia_patient_id`), read
  from the folder scan at load time (example id -> patient), so the prepared data carry none.
* aptos: about 70% train / 10% val / 20% test of the 3,662 labelled images, by image
  (:func:`stratified_split`, keyed by the ``id_code``).
  (The paper trained on 80%, n = 2,929, and selected models on its held-out 20%; we keep a
  separate validation split so that model selection never looks at the test split.)

Host -> device contract: ``Split.gather(indices)`` returns uint8 [k, S, S, 3] squares of side
``prep_size = round(image_size * 256 / 224)``, int32 labels and int64 stable example ids.
``Split.patients`` (int64 per position, a patient index shared by all splits of one load;
None for APTOS) and ``Split.units()`` give the privacy units: one patient's positions each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from dpjax import absl_logs
from dpjax.data import folders, tfds_builders
from dpjax.data.folders import DataError

DATASETS = ('pneumonia', 'aptos')
PNEUMONIA_VAL_FRACTION = 0.1
APTOS_SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # train, val, test


def expected_train_units(scan: folders.FolderScan, by_patient: bool) -> int:
  """About how many training units (images, or patients) `load_dataset` will give `scan`'s data.

  For checks that should not wait for the preparation (minutes on real data): the exact count
  comes with the loaded splits (files skipped as undecodable, and the split is drawn unit by
  unit, so its sizes are binomial around the fractions).
  """
  pool = scan.splits['train'] if scan.dataset == 'pneumonia' else scan.splits['labelled']
  count = len({r.patient for r in pool}) if by_patient else len(pool)
  fraction = 1 - PNEUMONIA_VAL_FRACTION if scan.dataset == 'pneumonia' else APTOS_SPLIT_FRACTIONS[0]
  return max(1, round(count * fraction))


def path_hash(relative_path: str) -> int:
  """A uint32 hash of a file's path inside its data folder (a public, stable example key)."""
  return int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:4], 'little')


def prep_size_for(image_size: int) -> int:
  """Side of the stored squares: the paper's Resize(256) -> CenterCrop(224), scaled."""
  return round(image_size * 256 / 224)


class Split:
  """One split: random access to (image, label, id) by position 0..len-1."""

  def __init__(self, name: str, source, record_indices: np.ndarray, labels: np.ndarray, ids: np.ndarray,
               patients: np.ndarray | None = None, stable_ids: np.ndarray | None = None):
    self.name = name
    self._source = source
    self._record_indices = np.asarray(record_indices, np.int64)
    self.labels = np.asarray(labels, np.int32)  # All labels of the split, in position order.
    self.ids = np.asarray(ids, np.int64)  # Stable example ids, in position order.
    # Patient index per position (the same patient has the same index in every split of one
    # load), or None when the data set has no patient ids (each image is its own unit).
    self.patients = None if patients is None else np.asarray(patients, np.int64)
    if self.patients is not None and self.patients.shape != self.ids.shape:
      raise ValueError(f'Expected one patient per example; got {self.patients.shape} for {self.ids.shape}')
    # A hash of each file's path in the data folder (uint32). Unlike `ids` (listing positions),
    # it does not change when other files are added or removed, so public per-example randomness
    # (augmentation) keyed on it never depends on the rest of the data set.
    self.stable_ids = (self.ids.astype(np.uint32) if stable_ids is None
                       else np.asarray(stable_ids, np.uint32))
    self.fast_decode = True  # False: decode through TFDS (same result, slower).

  def units(self) -> list[np.ndarray]:
    """Positions grouped by privacy unit: one sorted int64 array per patient, in patient-index
    order; one position per unit (in position order) when ``patients`` is None."""
    if self.patients is None:
      return list(np.arange(len(self), dtype=np.int64).reshape(-1, 1))
    if not len(self):
      return []
    order = np.argsort(self.patients, kind='stable')  # Stable: positions stay sorted in a patient.
    _, starts = np.unique(self.patients[order], return_index=True)
    return np.split(order.astype(np.int64), starts[1:])

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
  source: str  # The resolved data folder.
  skipped: list[str]  # Files / rows skipped under skip_bad=True, with the reason.
  official_val: Split | None = None  # pneumonia: the official 16-image val folder.
  notes: list[str] = dataclasses.field(default_factory=list)  # e.g. which nested copy was used.
  prepared_dir: str = ''  # Where the ArrayRecord files are.
  # Patient report (JSON-serialisable), None where there are no patient ids; see patient_report.
  patients: dict | None = None
  # FolderScan.content_fingerprint() of the data loaded, keyed with the cache's secret salt:
  # changes when any listed file, label or patient changes, not when the whole folder moves.
  fingerprint: str = ''
  is_demo: bool = False  # Set by an application that generated the data (synthetic demo data).


SPLIT_HASH_PERSON = b'dpjax.split.v1'  # Domain separation of the split hash (<= 16 bytes).


def unit_split_uniform(seed: int, key) -> float:
  """A uniform number in [0, 1) that depends only on ``seed`` and one unit's stable ``key``.

  BLAKE2b over ``'<seed>\\0<key>'`` (personalised with :data:`SPLIT_HASH_PERSON`), top 53 bits
  as a float. Public (the seed is published) and keyed on the unit alone: adding or removing
  any other unit cannot change it.
  """
  digest = hashlib.blake2b(f'{int(seed)}\0{key}'.encode(), digest_size=8,
                           person=SPLIT_HASH_PERSON).digest()
  return (int.from_bytes(digest, 'little') >> 11) / float(1 << 53)


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
  """Cumulative upper bounds of parts 1.. in [0, 1); part 0 gets what lies above the last."""
  fractions = [float(f) for f in fractions]
  if len(fractions) < 1 or any(not 0 <= f <= 1 for f in fractions) or sum(fractions[1:]) > 1 + 1e-12:
    raise ValueError(f'Expected fractions in [0, 1] whose parts 1.. sum to at most 1; cannot split by {fractions}')
  return np.cumsum(fractions[1:])


def _part_of_keys(keys: Sequence, fractions: Sequence[float], seed: int) -> np.ndarray:
  """Part of each unit key: j >= 1 when its uniform lies in [F_{j-1}, F_j) with F the cumulative
  sum of fractions[1:] (F_0 = 0), else 0. Each key's part depends only on (seed, key)."""
  bounds = _check_fractions(fractions)
  uniforms = np.asarray([unit_split_uniform(seed, k) for k in keys], np.float64).reshape(-1)
  part = np.searchsorted(bounds, uniforms, side='right') + 1  # u < F_1 -> 1, F_1 <= u < F_2 -> 2, ...
  part[part > len(bounds)] = 0  # Above every bound: part 0 (the rest).
  return part.astype(np.int64)


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int, *,
                     keys: Sequence) -> list[np.ndarray]:
  """Positions split one example (privacy unit) at a time by a keyed hash of its identity.

  ``keys[i]`` is position i's stable identity (APTOS: its ``id_code``), which must not depend
  on the rest of the data (positions or listing numbers do: removing one example renumbers the
  others). Each position independently goes to part j >= 1 with probability ``fractions[j]``
  and to part 0 otherwise, decided by :func:`unit_split_uniform` of (``seed``, its key) alone.

  Why: the seed is public, so a split that depends on the whole data set (e.g. a seeded
  permutation of each class) lets an adversary who knows the rest of the data compute the
  split of both neighbouring data sets; adding or removing one example would move dozens of
  OTHER examples between train and val, and released validation metrics would tell the two
  apart, voiding the DP guarantee. Here a neighbouring data set changes only the neighbour's
  own assignment.

  The class is intrinsic to the example, so each class's parts hold ``fractions[j]`` of it in
  expectation; the counts are binomial (approximate, not exact), and a small class can have
  none in a part. Each part is sorted. Deterministic in (``seed``, keys); ``labels`` only fix
  the length (the split does not look at them).
  """
  labels = np.asarray(labels)
  keys = list(keys)
  if labels.ndim != 1 or len(keys) != len(labels):
    raise ValueError(f'Expected labels [n] and one key per position; got {labels.shape} and {len(keys)} keys')
  if len({str(k) for k in keys}) != len(keys):
    raise ValueError('Expected one distinct key per position (each example its own unit)')
  # Each example its own group: the same per-unit draw (both hash str(key)).
  return stratified_group_split(labels, np.asarray([str(k) for k in keys], dtype=object),
                                fractions, seed)


def group_labels(labels: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """-> (group number per position (0.. in sorted group order), each group's label, each
  group's size). A group's label is its most common label (ties: the smallest)."""
  labels, groups = np.asarray(labels, np.int64), np.asarray(groups)
  unique, inverse = np.unique(groups, return_inverse=True)
  inverse = inverse.reshape(-1)
  table = np.zeros((len(unique), int(labels.max()) + 1 if labels.size else 1), np.int64)
  np.add.at(table, (inverse, labels), 1)
  return inverse, table.argmax(axis=1), table.sum(axis=1)


def stratified_group_split(labels: np.ndarray, groups: np.ndarray, fractions: Sequence[float],
                           seed: int) -> list[np.ndarray]:
  """Positions split by whole groups (patients), each group by a keyed hash of its identity.

  ``groups[i]`` is the stable identity of position i's privacy unit (pneumonia: the patient
  name, e.g. ``'person1946'``): a value that does not depend on the rest of the data (an index
  into the sorted patient list does not: adding one patient renumbers the others). Each group
  goes, with all its positions, to exactly one part: to part j >= 1 with probability
  ``fractions[j]``, to part 0 otherwise, decided by :func:`unit_split_uniform` of (``seed``,
  ``str(group)``) alone.

  Why: the seed is public, so a split that depends on the whole data set (e.g. a seeded
  permutation of each class's patients) lets an adversary who knows the rest of the data
  compute the split of both neighbouring data sets; adding or removing one patient would move
  dozens of OTHER patients between train and val, and released validation metrics would tell
  the two apart, voiding the patient-level DP guarantee. Here a neighbouring data set changes
  only the neighbour's own assignment.

  A group's class (its most common label, see :func:`group_labels`) is intrinsic to the
  group, so each class's parts hold ``fractions[j]`` of its groups in expectation (and of its
  images, as group sizes do not affect the draw); the counts are binomial (approximate, not
  exact), and a small class can have no group in a part. Each part is sorted. Deterministic in
  (``seed``, group identities).
  """
  labels, groups = np.asarray(labels), np.asarray(groups)
  if labels.shape != groups.shape or labels.ndim != 1:
    raise ValueError(f'Expected labels and groups of one shape [n]; got {labels.shape} and {groups.shape}')
  unique, group_of_position = np.unique(groups, return_inverse=True)
  part_of_group = _part_of_keys([str(g) for g in unique.tolist()], fractions, seed)
  position_part = part_of_group[group_of_position.reshape(-1)]
  return [np.flatnonzero(position_part == j).astype(np.int64) for j in range(len(fractions))]


def patient_report(splits: dict[str, Split], unparsed: int, id_source: str) -> dict:
  """The JSON-serialisable patient summary of one load (``DatasetSplits.patients``).

  ``splits``: name -> Split, with 'train', 'val' (drawn from the official train folder) and
  'test' (the official test folder), optionally 'official_val'. Keys of the result:
  ``unit`` ('patient'), ``id_source``, ``unparsed_file_names`` (images that are their own
  patient), ``num_patients`` (all splits), ``per_split`` (name -> ``patients``, ``images``,
  ``max_images_per_patient``, ``mean_images_per_patient``), ``train_val_overlap`` (patients in
  both train and val: 0 by construction), ``official_train_test_overlap`` (patients with images
  in both the official train and test folders; the official split is kept as shipped) and
  ``official_train_val_overlap`` (the same for the official val folder, when present).
  """
  def patient_set(*names):
    return set().union(*(set(splits[n].patients.tolist()) for n in names if n in splits))

  per_split = {}
  for name, split in splits.items():
    counts = np.unique(split.patients, return_counts=True)[1]
    per_split[name] = {'patients': int(len(counts)), 'images': int(len(split)),
                       'max_images_per_patient': int(counts.max()) if counts.size else 0,
                       'mean_images_per_patient': round(float(counts.mean()), 4) if counts.size else 0.0}
  official_train = patient_set('train', 'val')
  report = {
      'unit': 'patient',
      'id_source': id_source,
      'unparsed_file_names': int(unparsed),
      'num_patients': len(patient_set(*splits)),
      'per_split': per_split,
      'train_val_overlap': len(patient_set('train') & patient_set('val')),
      'official_train_test_overlap': len(official_train & patient_set('test')),
  }
  if 'official_val' in splits:
    report['official_train_val_overlap'] = len(official_train & patient_set('official_val'))
  return report


PNEUMONIA_ID_SOURCE = ('Kermany file names: person<N>_<bacteria|virus>_<k> -> person<N>; '
                       '[NORMAL2-]IM-<N>-<k> -> [NORMAL2-]IM-<N>; any other name is its own patient')


def default_cache_root() -> Path:
  """Where prepared data go: ``$DPJAX_CACHE`` if set, else ``~/.cache/dpjax``."""
  return Path(os.environ.get('DPJAX_CACHE') or Path.home() / '.cache' / 'dpjax')


def scan_dataset(name: str, data_dir: str | os.PathLike, *,
                 skip_bad: bool = False) -> folders.FolderScan:
  """The cheap part of :func:`load_dataset`: the folder scan, without decoding any image.

  For fingerprinting the data before loading them (``scan.content_fingerprint(salt)``, keyed
  with a secret salt); pass the result to ``load_dataset(..., scan=scan)`` to load without
  scanning again. Arguments and errors as for :func:`load_dataset`.
  """
  if name not in DATASETS:
    raise ValueError(f'Unknown dataset {name!r}; expected one of {DATASETS}')
  return folders.scan_folder(name, data_dir, skip_bad=skip_bad)


SALT_BYTES = 32
CACHE_SALT_FILE = 'secret_salt'  # In the cache root; keys every fingerprint in the cache's names.


def read_salt(path: str | os.PathLike) -> bytes | None:
  """The salt in ``path`` (made by :func:`create_salt`), or None when there is no such file."""
  path = Path(path)
  try:
    salt = path.read_bytes()
  except FileNotFoundError:
    return None
  except OSError as e:
    raise DataError(f'{path}: cannot read this secret salt file ({e.strerror})') from None
  if len(salt) != SALT_BYTES:
    raise DataError(f'{path} is not a secret salt file ({len(salt)} bytes, expected {SALT_BYTES}); '
                    'delete it and a new one is made')
  return salt


def create_salt(path: str | os.PathLike, salt: bytes | None = None) -> bytes:
  """Writes ``salt`` (default: 32 fresh random bytes) to ``path`` with mode 0600 unless the file
  exists; returns what the file holds, so processes racing to create it all get one salt.

  A digest of the data keyed with this secret says nothing about who is in the data to anyone
  without it (an unkeyed one can be recomputed from candidate data: membership inference).
  """
  path = Path(path)
  existing = read_salt(path)
  if existing is not None:
    return existing
  salt = os.urandom(SALT_BYTES) if salt is None else salt
  if len(salt) != SALT_BYTES:
    raise ValueError(f'Expected a salt of {SALT_BYTES} bytes')
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')  # 0600.
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(salt)
      f.flush()
      os.fsync(f.fileno())
    try:
      os.link(tmp, path)  # Complete or absent, and never replaces another process's salt.
    except FileExistsError:
      pass
  finally:
    Path(tmp).unlink(missing_ok=True)
  return read_salt(path)


def cache_salt(cache_root: str | os.PathLike) -> bytes:
  """The cache's secret salt, ``<cache>/secret_salt``, made once (0600) on first use."""
  return create_salt(Path(cache_root) / CACHE_SALT_FILE)


def prepared_root(cache_root: str | os.PathLike, scan: folders.FolderScan) -> Path:
  """``<cache>/tfds/<name>-<listing fingerprint>``: the TFDS data_dir of one folder content
  (one prepared copy per distinct content and location; each prep size is a config in it).

  The fingerprint is keyed with the cache's secret salt: TFDS prints this path, and an
  unkeyed hash of every file's path, size and time would let anyone with candidate data
  test membership.
  """
  return Path(cache_root) / 'tfds' / f'{scan.dataset}-{scan.fingerprint(cache_salt(cache_root))[:16]}'


def _adopt_unsalted_copy(cache_root: Path, scan: folders.FolderScan, tfds_dir: Path) -> None:
  """Renames a copy prepared by an older dpjax, named by the UNKEYED fingerprint, to ``tfds_dir``
  (or deletes it when ``tfds_dir`` exists), and deletes its lock file: the data are kept, the
  name that could reveal membership goes."""
  legacy = Path(cache_root) / 'tfds' / f'{scan.dataset}-{scan.fingerprint()[:16]}'
  legacy_lock = legacy.with_name(legacy.name + '.lock')
  if not (legacy.exists() or legacy_lock.exists()):
    return
  with _exclusive_lock(tfds_dir.with_name(tfds_dir.name + '.lock')):
    with _exclusive_lock(legacy_lock):  # An older dpjax may be preparing it right now.
      if legacy.is_dir() and not tfds_dir.exists():
        os.rename(legacy, tfds_dir)
        logging.info('Renamed a prepared copy of %s to %s (keyed name)', scan.dataset, tfds_dir)
      elif legacy.is_dir():
        shutil.rmtree(legacy, ignore_errors=True)
      # Deleted while held: only a concurrent older dpjax could still wait on it.
      legacy_lock.unlink(missing_ok=True)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
  """Holds an exclusive ``flock`` on ``lock_path`` (created if missing, never deleted: deleting
  a lock file lets a third process lock a new file while a second holds the old one)."""
  try:
    import fcntl  # pylint: disable=import-outside-toplevel
  except ImportError:  # Not POSIX (Windows): no cross-process lock; one process at a time, please.
    yield
    return
  lock_path.parent.mkdir(parents=True, exist_ok=True)
  fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logging.info('Waiting for another process preparing the same data (lock %s)', lock_path)
      fcntl.flock(fd, fcntl.LOCK_EX)  # Released when the holder finishes, fails or dies.
    yield
  finally:
    os.close(fd)  # Closing the only descriptor releases the lock.


def _remove_incomplete(builder) -> list[str]:
  """Deletes what killed preparations of ``builder`` left behind; call with the lock held.

  TFDS writes a preparation into ``<data_dir>/<builder>/<config>/incomplete.<random>_<version>/``
  and renames it to ``<version>/`` when done; a killed process leaves it there. The builder's
  ``.config/`` folder gets ``incomplete.<uuid>.metadata.json`` files the same way.
  """
  config_dir = Path(builder.data_path).parent
  removed = []
  for folder in (config_dir, config_dir.parent / '.config'):
    if not folder.is_dir():
      continue
    for leftover in sorted(folder.glob('incomplete.*')):
      if leftover.is_dir() and not leftover.is_symlink():
        shutil.rmtree(leftover, ignore_errors=True)
      else:
        leftover.unlink(missing_ok=True)
      removed.append(str(leftover))
  if removed:
    logging.info('Removed %d leftovers of interrupted data preparations: %s', len(removed), ', '.join(removed))
  return removed


def _check_not_empty(pool: Split, parts: dict[str, np.ndarray], fractions: Sequence[float], seed: int,
                     class_names: Sequence[str], notes: list[str]) -> None:
  """Raises DataError when the per-unit draw left a split empty; notes the classes a split lacks.

  No re-balancing: moving some other unit into an empty split would make that unit's
  assignment depend on the rest of the data, which is what the per-unit draw avoids.
  """
  num_units = len(pool.units())
  unit = 'patients' if pool.patients is not None else 'images'
  for (name_, positions), fraction in zip(parts.items(), fractions):
    if not len(positions):
      raise DataError(
          f'The {name_} split is empty: each of the {num_units} {unit} goes to {name_} with probability '
          f'{fraction:g}, independently (keyed on seed {seed} and the unit alone, for privacy), and none did; '
          'more data are needed')
    missing = sorted(set(np.unique(pool.labels).tolist()) - set(pool.labels[positions].tolist()))
    if missing:
      notes.append(f'The {name_} split has no images of class ' + ', '.join(class_names[c] for c in missing) +
                   f' (split drawn per unit, about {fraction:g} of each class in expectation)')


def load_dataset(name: str, data_dir: str | os.PathLike, image_size: int, *, seed: int = 0,
                 skip_bad: bool = False, cache_dir: str | os.PathLike | None = None,
                 scan: folders.FolderScan | None = None, progress: bool = True) -> DatasetSplits:
  """Loads 'pneumonia' or 'aptos' from ``data_dir``.

  Args:
    name: 'pneumonia' or 'aptos'.
    data_dir: the Kaggle folder (see :mod:`dpjax.data.folders` for accepted layouts).
    image_size: side of the network input; images are stored at ``prep_size_for(image_size)``.
    seed: picks the train/val(/test) split, unit by unit (see :func:`stratified_group_split`).
    skip_bad: skip undecodable images and bad CSV rows (listed in ``skipped``) instead of raising.
    cache_dir: where prepared data go; default :func:`default_cache_root`.
    scan: the result of ``scan_dataset(name, data_dir, skip_bad=skip_bad)`` made earlier (e.g.
      to fingerprint the data first), used instead of scanning again.
    progress: show TFDS's progress bars while preparing (minutes for 5,000 X-rays).

  Preparation (decoding every image into ``<cache>/tfds``) happens once per folder content and
  prep size, under an exclusive file lock ``<cache>/tfds/<name>-<keyed fingerprint>.lock``: processes
  loading the same data at once (one multi-host job's processes on one machine, a shared
  cache) wait for the first one to prepare, then load its copy. Leftovers of a preparation that
  was killed are deleted before preparing again.

  Raises:
    DataError: missing folder, wrong layout, a bad file / row when skip_bad is False (then
      with ``skippable=True``), or a split that the per-unit draw left empty (tiny data).
  """
  if name not in DATASETS:
    raise ValueError(f'Unknown dataset {name!r}; expected one of {DATASETS}')
  if image_size < 1:
    raise ValueError(f'Expected {image_size=} >= 1')
  cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_root()
  if scan is None:
    scan = scan_dataset(name, data_dir, skip_bad=skip_bad)
  elif scan.dataset != name:
    raise ValueError(f'Expected a scan of {name!r}; got one of {scan.dataset!r}')
  prep_size = prep_size_for(image_size)

  # One prepared copy per distinct folder content: the fingerprint changes with the files.
  tfds_dir = prepared_root(cache_root, scan)
  builder_cls = tfds_builders.BUILDERS[name]

  def make_builder(for_preparing: bool):
    extra = {'scan': scan, 'skip_bad': skip_bad} if for_preparing else {}
    return builder_cls(config=tfds_builders.prep_config(prep_size), data_dir=str(tfds_dir), **extra)

  with absl_logs.errors_only():
    _adopt_unsalted_copy(cache_root, scan, tfds_dir)
    builder = make_builder(False)
    if not builder.is_prepared():
      with _exclusive_lock(tfds_dir.with_name(tfds_dir.name + '.lock')):
        builder = make_builder(True)  # Again under the lock: another process may have prepared it.
        if not builder.is_prepared():
          _remove_incomplete(builder)
          logging.info('Preparing %s at %d px from %s into %s (once)', name, prep_size, scan.root, tfds_dir)
          tfds.display_progress_bar(progress)
          builder.download_and_prepare(
              download_config=tfds.download.DownloadConfig(manual_dir=str(scan.root)), file_format='array_record')
        builder = make_builder(False)
  metadata = builder.info.metadata
  skipped = list(metadata.get('skipped', []))
  if skipped and not skip_bad:  # Prepared earlier with skip_bad=True; the files are still bad.
    more = f' (and {len(skipped) - 1} more)' if len(skipped) > 1 else ''
    raise DataError(f'{skipped[0]}{more}', skippable=True)
  sources = builder.as_data_source()

  stable_of_id = {r.example_id: path_hash(r.path.relative_to(scan.root).as_posix())
                  for records in scan.splits.values() for r in records}
  # Patients: from the scan (example id -> patient string), indexed over all splits of the scan.
  patient_of_id = {r.example_id: r.patient for records in scan.splits.values() for r in records
                   if r.patient is not None}
  patient_names = sorted(set(patient_of_id.values()))
  patient_index = {p: i for i, p in enumerate(patient_names)}

  def whole(split: str) -> Split:
    info = metadata['splits'][split]
    labels = np.asarray(info['labels'], np.int32)
    ids = np.asarray(info['ids'], np.int64)
    patients = None
    if patient_of_id:
      try:
        patients = np.asarray([patient_index[patient_of_id[i]] for i in ids.tolist()], np.int64)
      except KeyError as e:  # Cannot happen unless the prepared copy and the folder disagree.
        raise DataError(f'Prepared data for split {split!r} hold example id {e} that the folder scan lacks; '
                        'delete the prepared copy under the cache dir tfds/ and retry') from None
    stable = np.asarray([stable_of_id[i] for i in ids.tolist()], np.uint32)
    return Split(split, sources[split], np.arange(len(labels)), labels, ids, patients, stable)

  def subset(split: Split, name_: str, positions: np.ndarray) -> Split:
    return Split(name_, split._source, split._record_indices[positions], split.labels[positions],  # pylint: disable=protected-access
                 split.ids[positions], None if split.patients is None else split.patients[positions],
                 split.stable_ids[positions])

  notes = list(metadata.get('notes', []))
  patients = None
  if name == 'pneumonia':
    pool = whole('train')
    # Keyed by the patient NAME (stable), not by its index in the sorted list (which shifts when
    # a patient is added or removed).
    names_of_pool = np.asarray(patient_names, dtype=object)[pool.patients]
    fractions = (1 - PNEUMONIA_VAL_FRACTION, PNEUMONIA_VAL_FRACTION)
    train_pos, val_pos = stratified_group_split(pool.labels, names_of_pool, fractions, seed)
    _check_not_empty(pool, {'train': train_pos, 'val': val_pos}, fractions, seed, scan.class_names, notes)
    train, val, test = subset(pool, 'train', train_pos), subset(pool, 'val', val_pos), whole('test')
    official_val = whole('official_val') if 'official_val' in metadata['splits'] else None
    named = {'train': train, 'val': val, 'test': test}
    if official_val is not None:
      named['official_val'] = official_val
    patients = patient_report(named, scan.unparsed_patient_names, PNEUMONIA_ID_SOURCE)
    if scan.unparsed_patient_names:
      notes.append(f'{scan.unparsed_patient_names} file names carry no patient id; each of those images '
                   'is its own patient (privacy unit)')
    if patients['official_train_test_overlap']:
      notes.append(f"{patients['official_train_test_overlap']} patients have images in both the official "
                   'train and test folders (the official split is kept as Kaggle ships it)')
  else:
    pool = whole('train')
    # Keyed by the id_code (the image's file name without suffix: stable), not by its position.
    id_code_of_id = {r.example_id: r.path.stem for r in scan.splits['labelled']}
    id_codes = [id_code_of_id[i] for i in pool.ids.tolist()]
    train_pos, val_pos, test_pos = stratified_split(pool.labels, APTOS_SPLIT_FRACTIONS, seed, keys=id_codes)
    _check_not_empty(pool, {'train': train_pos, 'val': val_pos, 'test': test_pos}, APTOS_SPLIT_FRACTIONS, seed,
                     scan.class_names, notes)
    train, val, test = (subset(pool, n, p) for n, p in (('train', train_pos), ('val', val_pos), ('test', test_pos)))
    official_val = None

  return DatasetSplits(
      train=train, val=val, test=test, num_classes=len(scan.class_names), class_names=tuple(scan.class_names),
      prep_size=prep_size, image_size=image_size, source=str(scan.root),
      skipped=skipped, official_val=official_val, notes=notes, prepared_dir=str(builder.data_dir),
      patients=patients, fingerprint=scan.content_fingerprint(cache_salt(cache_root)))
