"""Scanning the Kaggle folder layouts as people actually have them on disk.

Pneumonia (Kermany et al., Kaggle "chest-xray-pneumonia"): ``chest_xray/{train,val,test}/
{NORMAL,PNEUMONIA}/*.jpeg``. ``data_dir`` may be the folder that contains ``chest_xray/``,
``chest_xray/`` itself, or the zip's nested duplicate ``chest_xray/chest_xray/``. When both
a folder and its nested duplicate hold the layout, the outer one is used (and a note says
so); images are never counted twice. ``__MACOSX/``, ``._*`` resource forks and ``.DS_Store``
are ignored.

APTOS 2019 (Kaggle "aptos2019-blindness-detection"): ``train.csv`` with ``id_code,diagnosis``
and ``train_images/<id_code>.png``.

Problems (an undecodable image, a CSV row whose image is missing, a label outside 0-4) raise
:class:`DataError` naming the file, with ``skippable=True``; with ``skip_bad=True`` the item is
skipped and listed in ``skipped`` instead. (The messages name no command-line flag: the
application adds its own hint to skippable errors.) Every image gets a stable integer example id (its position in the sorted
listing, assigned before anything is skipped), which local-DP noise is keyed on.

Patients (the privacy unit): Kermany file names carry the patient, see
:func:`pneumonia_patient_id` (``person1946_bacteria_4874.jpeg`` -> ``person1946``,
``NORMAL2-IM-1427-0001.jpeg`` -> ``NORMAL2-IM-1427``). Every pneumonia record gets a patient
string, global across the official split folders (the same string in train/ and test/ is the
same patient); a name that does not parse gets a fallback id of its own
(``'file:<split folder>/<class>/<name>'``), so that image is its own patient, and is counted in
``FolderScan.unparsed_patient_names``. APTOS ``id_code``s carry no patient: ``patient`` is None.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import functools
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from dpjax.errors import UserInputError

PNEUMONIA_CLASS_NAMES = ('NORMAL', 'PNEUMONIA')
APTOS_CLASS_NAMES = ('No DR', 'Mild', 'Moderate', 'Severe', 'Proliferative DR')
PNEUMONIA_SPLITS = {'train': 'train', 'official_val': 'val', 'test': 'test'}  # our name -> folder
IMAGE_SUFFIXES = ('.jpeg', '.jpg', '.png')
APTOS_IMAGE_SUFFIXES = ('.png', '.jpeg', '.jpg')


class DataError(UserInputError):
  """A data folder, file or label that cannot be used; the message names the path.

  ``skippable``: True when ``skip_bad=True`` would skip the offending item (an undecodable
  image, a bad CSV row) instead of raising; the application may then add a hint on how to
  skip such items. False for problems that skipping cannot fix (a missing folder, a wrong
  layout, no usable images at all).
  """

  def __init__(self, message: str = '', *, skippable: bool = False):
    super().__init__(message)
    self.skippable = bool(skippable)

  def __reduce__(self):  # Keep `skippable` through pickling (e.g. across processes).
    return (functools.partial(type(self), skippable=self.skippable), self.args)


# Kaggle: PNEUMONIA person<N>_<bacteria|virus>_<image number>; NORMAL [<prefix>-]IM-<N>-<k>.
# Mendeley (the original release): <NORMAL|BACTERIA|VIRUS>-<patient>-<k>.
_IMAGE_EXT = r'\.(?:jpe?g|png)'
_PERSON_NAME = re.compile(r'person(\d+)_(?:bacteria|virus)_\d+' + _IMAGE_EXT, re.IGNORECASE)
_IM_NAME = re.compile(r'((?:[a-z0-9]+-)*im-\d+)-\d+' + _IMAGE_EXT, re.IGNORECASE)
_MENDELEY_NAME = re.compile(r'(?:normal|bacteria|virus)-(\d+)-\d+' + _IMAGE_EXT, re.IGNORECASE)
UNPARSED_PATIENT_PREFIX = 'file:'


def pneumonia_patient_id(file_name: str) -> str | None:
  """The patient of a Kermany chest X-ray file name, or None when the name does not say.

  ``person1946_bacteria_4874.jpeg`` and ``person1946_virus_4875.jpeg`` -> ``'person1946'``
  (leading zeros and case normalised); ``IM-0115-0001.jpeg`` -> ``'IM-0115'`` and
  ``NORMAL2-IM-1427-0001.jpeg`` -> ``'NORMAL2-IM-1427'`` (the name without its last ``-NNNN``,
  upper-cased). The Mendeley release's ``BACTERIA-1008087-0001.jpeg`` -> ``'mendeley-1008087'``
  (one patient whatever the class prefix: merging two people costs utility, splitting one
  would weaken the guarantee). Extensions .jpeg/.jpg/.png, any case. Only the base name is
  looked at.
  """
  name = os.path.basename(file_name.strip())
  match = _PERSON_NAME.fullmatch(name)
  if match:
    return f'person{int(match.group(1))}'
  match = _IM_NAME.fullmatch(name)
  if match:
    return match.group(1).upper()
  match = _MENDELEY_NAME.fullmatch(name)
  if match:
    return f'mendeley-{int(match.group(1))}'
  return None


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  """One labelled image file."""
  path: Path
  label: int
  example_id: int
  patient: str | None = None  # pneumonia: patient id (global across splits); aptos: None.


@dataclasses.dataclass
class FolderScan:
  """The labelled images found in a data folder, per split, before decoding."""
  dataset: str  # 'pneumonia' or 'aptos'
  root: Path  # The folder the images are read from (after resolving nesting).
  splits: dict[str, list[ImageRecord]]  # pneumonia: train/official_val/test; aptos: labelled
  class_names: tuple[str, ...]
  skipped: list[str] = dataclasses.field(default_factory=list)  # 'path: reason'
  notes: list[str] = dataclasses.field(default_factory=list)  # e.g. which copy was used
  # pneumonia: file names without a patient id (each such image is its own patient).
  unparsed_patient_names: int = 0

  def fingerprint(self, salt: bytes | None = None) -> str:
    """Hash of the listing (paths, sizes, mtimes, labels, ids): changes when the data change.

    With ``salt`` (a secret of at least 16 bytes, e.g. :func:`dpjax.data.datasets.cache_salt`)
    it is keyed BLAKE2b-256. Without it, the unkeyed SHA-256: anyone holding candidate data
    can recompute that and test who is in the data set, so it must never be shown, logged or
    used in a path (it is kept to find copies prepared before the salt existed).
    """
    digest = _listing_digest(salt)
    digest.update(json.dumps([self.dataset, str(self.root), self.skipped]).encode())
    for split in sorted(self.splits):
      for record in self.splits[split]:
        stat = record.path.stat()
        digest.update(f'{split}|{record.path}|{stat.st_size}|{stat.st_mtime_ns}|{record.label}|'
                      f'{record.example_id}\n'.encode())
    return digest.hexdigest()

  def content_fingerprint(self, salt: bytes | None = None) -> str:
    """A hex digest of what the data are, wherever the folder is: for runs to record.

    Covers the dataset name and, for every listed file of every split (in listing order): the
    split, its path relative to ``root`` (so moving or copying the whole folder with its
    timestamps does not change it), its size, its modification time (ns), its label, its
    patient and its example id. Moving an image to another class, adding, removing, touching
    or rewriting one changes it. Only ``stat``s the files (no reading): about 5,000 files in
    tens of milliseconds. Unlike :meth:`fingerprint` (the prepared-data cache key, which
    includes the absolute root), it does not depend on where the folder is.

    With ``salt`` (a secret of at least 16 bytes) it is keyed BLAKE2b-256 (64 hex digits as
    well), which tells nothing about the data to anyone without the salt; what a run records
    or compares must be salted (see :meth:`fingerprint` on the unkeyed hash).
    """
    digest = _listing_digest(salt)
    digest.update(json.dumps(['dpjax-data-content-v1', self.dataset]).encode())
    for split in sorted(self.splits):
      for record in self.splits[split]:
        stat = os.stat(record.path)
        digest.update(json.dumps([split, record.path.relative_to(self.root).as_posix(), stat.st_size,
                                  stat.st_mtime_ns, record.label, record.patient, record.example_id]).encode())
        digest.update(b'\n')
    return digest.hexdigest()


def _listing_digest(salt: bytes | None):
  """Unkeyed SHA-256, or BLAKE2b-256 keyed with ``salt`` (16 to 64 bytes)."""
  if salt is None:
    return hashlib.sha256()
  if not isinstance(salt, bytes) or not 16 <= len(salt) <= 64:
    raise ValueError('Expected a salt of 16 to 64 bytes')  # Never echo a secret.
  return hashlib.blake2b(key=salt, digest_size=32)


def scan_folder(dataset: str, data_dir: str | os.PathLike, *, skip_bad: bool = False) -> FolderScan:
  """Dispatches to :func:`scan_pneumonia` or :func:`scan_aptos`."""
  if dataset == 'pneumonia':
    return scan_pneumonia(data_dir, skip_bad=skip_bad)
  if dataset == 'aptos':
    return scan_aptos(data_dir, skip_bad=skip_bad)
  raise ValueError(f"Unknown dataset {dataset!r}; expected 'pneumonia' or 'aptos'")


def _link_problem(path: Path) -> str | None:
  """What is wrong with ``path`` as a symbolic link (a loop, a missing target), or None."""
  try:
    os.stat(path)
  except OSError as e:
    if e.errno == errno.ELOOP:
      return (f'{path} is a symbolic link loop (it leads, through links, back to itself); '
              'remove or fix the link')
    if os.path.islink(path):
      try:
        target = os.readlink(path)
      except OSError:
        target = '?'
      return f'{path} is a symbolic link to {target}, which does not exist; remove or fix the link'
  return None


def _scan_dir(folder: Path) -> list[os.DirEntry]:
  """The entries of ``folder``; DataError naming it when it cannot be read."""
  try:
    with os.scandir(folder) as entries:
      return list(entries)
  except OSError as e:
    raise DataError(f'Cannot read folder {folder} ({e.strerror or e}); check its permissions') from None


def _existing_dir(data_dir: str | os.PathLike) -> Path:
  path = Path(data_dir).expanduser()
  problem = _link_problem(path)
  if problem:
    raise DataError(f'Data folder {problem}')
  if not path.is_dir():
    raise DataError(f'Data folder {path} does not exist (or is not a folder)')
  return path.resolve()


def _is_ignored(name: str) -> bool:
  # macOS resource forks ('._x.jpeg'), '.DS_Store' and other hidden files.
  return name.startswith('.') or name == '__MACOSX'


def _has_pneumonia_layout(folder: Path) -> bool:
  return all((folder / split / cls).is_dir() for split in ('train', 'test') for cls in PNEUMONIA_CLASS_NAMES)


def scan_pneumonia(data_dir: str | os.PathLike, *, skip_bad: bool = False) -> FolderScan:
  """Lists the chest X-ray images per split; see the module docstring for accepted layouts.

  ``val/`` (the official 16-image validation set) is optional; ``train/`` and ``test/`` with
  ``NORMAL/`` and ``PNEUMONIA/`` are required. Labels: NORMAL = 0, PNEUMONIA = 1.
  """
  path = _existing_dir(data_dir)
  candidates = [path, path / 'chest_xray', path / 'chest_xray' / 'chest_xray']
  found = [c for c in candidates if _has_pneumonia_layout(c)]
  if not found:
    for candidate in candidates:  # A broken link where the layout should be: name it.
      for part in [candidate, *(candidate / split for split in ('train', 'val', 'test')),
                   *(candidate / split / cls for split in ('train', 'val', 'test')
                     for cls in PNEUMONIA_CLASS_NAMES)]:
        problem = _link_problem(part)
        if problem:
          raise DataError(problem)
    raise DataError(f'{path} has no chest X-ray layout: expected chest_xray/{{train,test}}/'
                    f'{{NORMAL,PNEUMONIA}}/ inside it (or {path} to be that chest_xray/ folder)')
  root, notes = found[0], []
  for other in found[1:]:
    if other.is_relative_to(root):
      notes.append(f'Using {root}; ignored its nested duplicate {other} (never counting images twice)')

  splits: dict[str, list[ImageRecord]] = {}
  skipped: list[str] = []
  next_id = unparsed = 0
  for split, folder_name in PNEUMONIA_SPLITS.items():
    records = []
    for label, class_name in enumerate(PNEUMONIA_CLASS_NAMES):
      class_dir = root / folder_name / class_name
      if not class_dir.is_dir() and _link_problem(class_dir):
        raise DataError(_link_problem(class_dir))
      names = []
      for entry in sorted(_scan_dir(class_dir), key=lambda e: e.name) if class_dir.is_dir() else []:
        if _is_ignored(entry.name) or not entry.name.lower().endswith(IMAGE_SUFFIXES):
          continue
        problem = _link_problem(class_dir / entry.name) if entry.is_symlink() else None
        if problem:  # A looping or dangling link named like an image.
          if not skip_bad:
            raise DataError(problem, skippable=True)
          skipped.append(problem)
        elif entry.is_file():
          names.append(entry.name)
      if not names and split != 'official_val':
        raise DataError(f'No images in {class_dir} (expected *.jpeg files)')
      for name in names:
        patient = pneumonia_patient_id(name)
        if patient is None:  # Its own patient: a unique id per image file.
          patient = f'{UNPARSED_PATIENT_PREFIX}{folder_name}/{class_name}/{name}'
          unparsed += 1
        records.append(ImageRecord(class_dir / name, label, next_id, patient))
        next_id += 1
    splits[split] = records
  return FolderScan('pneumonia', root, splits, PNEUMONIA_CLASS_NAMES, skipped, notes, unparsed)


def scan_aptos(data_dir: str | os.PathLike, *, skip_bad: bool = False) -> FolderScan:
  """Lists the labelled APTOS images (all in split 'labelled'); example id = CSV data row index."""
  root = _existing_dir(data_dir)
  csv_path, image_dir = root / 'train.csv', root / 'train_images'
  if not csv_path.is_file() or not image_dir.is_dir():
    raise DataError(f'{root} lacks train.csv and/or train_images/ (expected the APTOS 2019 Kaggle layout)')
  available = {entry.name for entry in _scan_dir(image_dir) if not _is_ignored(entry.name)}
  records, skipped, seen = [], [], set()

  def bad(message: str) -> None:
    if not skip_bad:
      raise DataError(message, skippable=True)
    skipped.append(message)

  # utf-8-sig: Excel's "CSV UTF-8" starts the file with a byte order mark (read as part of
  # 'id_code' otherwise). newline='': the csv module handles LF and CRLF line ends itself.
  try:
    with open(csv_path, newline='', encoding='utf-8-sig') as f:
      reader = csv.DictReader(f)
      fieldnames, rows = reader.fieldnames, list(reader)
  except UnicodeDecodeError as e:
    raise DataError(f'{csv_path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as CSV UTF-8') from None
  if not fieldnames or not {'id_code', 'diagnosis'} <= set(fieldnames):
    raise DataError(f'{csv_path} needs the header id_code,diagnosis; found {fieldnames}')
  for row_index, row in enumerate(rows):
    where = f'{csv_path} row {row_index + 2}'  # Line number, counting the header.
    code, grade = (row['id_code'] or '').strip(), (row['diagnosis'] or '').strip()
    name = next((code + s for s in APTOS_IMAGE_SUFFIXES if code + s in available), None)
    if not code or name is None:
      bad(f'{where}: image {image_dir / (code + ".png")} not found')
      continue
    if code in seen:
      bad(f'{where}: duplicate id_code {code}')
      continue
    problem = _link_problem(image_dir / name)
    if problem:
      bad(f'{where}: {problem}')
      continue
    try:
      label = int(grade)
    except ValueError:
      label = -1
    if label not in range(len(APTOS_CLASS_NAMES)) or str(label) != grade.lstrip('+'):
      bad(f'{where}: diagnosis {grade!r} for {image_dir / name} is not an integer grade 0-4')
      continue
    seen.add(code)
    records.append(ImageRecord(image_dir / name, label, row_index))
  if not records:
    raise DataError(f'{csv_path} lists no usable images')
  return FolderScan('aptos', root, {'labelled': records}, APTOS_CLASS_NAMES, skipped, [])


_SIXTEEN_BIT_GREY_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')
_GREY_MODES = ('1', 'LA', 'La')  # Converted to 'L' (resized as one channel, then 3 equal ones).
_SIXTEEN_BIT_MAX = 65535


def _as_l_or_rgb(image: Image.Image, path: str | os.PathLike) -> Image.Image:
  """``image`` as mode 'L' (grey) or 'RGB', 16-bit grey scaled to 8 bits (never clipped).

  * 'L', 'RGB': as they are. (Pillow opens a 16-bit RGB(A) PNG as 8-bit 'RGB'/'RGBA' already,
    keeping the high byte of each sample, i.e. floor(v / 256): within 1 of v * 255 / 65535.)
  * 16-bit grey ('I;16', 'I;16B', ...; Pillow opens 16-bit grey PNGs and TIFFs so), and 'I'
    (32-bit integer) whose values all lie in 0-65535: round(v * 255 / 65535).
  * '1', 'LA': Pillow's conversion to 'L'; 'RGBA', 'P', 'PA', 'CMYK', 'YCbCr' and the rest:
    Pillow's conversion to 'RGB' (alpha dropped, palette looked up).
  * 'F' (floating point) and 'I' with values outside 0-65535 have no agreed 8-bit meaning:
    refused with a (skippable) DataError naming the file and its mode.
  """
  mode = image.mode
  if mode in ('L', 'RGB'):
    return image
  if mode in _SIXTEEN_BIT_GREY_MODES or mode == 'I':
    values = np.asarray(image)
    if mode == 'I' and values.size:
      low, high = int(values.min()), int(values.max())
      if low < 0 or high > _SIXTEEN_BIT_MAX:
        raise DataError(f"Cannot use image {path}: mode 'I' (32-bit integer) with values {low}..{high} "
                        f'outside 0-{_SIXTEEN_BIT_MAX}; save it as an 8- or 16-bit image', skippable=True)
    # No ties: v * 255 / 65535 is never k + 0.5 for an integer v (65535 is odd).
    scaled = np.rint(values.astype(np.float64) * (255 / _SIXTEEN_BIT_MAX)).astype(np.uint8)
    return Image.fromarray(scaled)  # 2-D uint8 -> mode 'L'
  if mode.startswith('F'):
    raise DataError(f"Cannot use image {path}: mode '{mode}' (floating point) has no 8-bit scale; "
                    'save it as an 8- or 16-bit image', skippable=True)
  try:
    return image.convert('L' if mode in _GREY_MODES else 'RGB')
  except ValueError as e:  # A mode Pillow cannot convert (e.g. 'LAB').
    raise DataError(f"Cannot use image {path}: mode '{mode}' does not convert to RGB ({e})", skippable=True) from None


def load_square_image(path: str | os.PathLike, size: int) -> np.ndarray:
  """Decodes an image as uint8 RGB [size, size, 3]: shorter side resized to ``size``, centre crop.

  Matches torchvision ``Resize(size)`` (bilinear, antialiased, longer side truncated) followed
  by ``CenterCrop(size)``. Grayscale becomes 3 equal channels. Image modes are converted as
  :func:`_as_l_or_rgb` says (16-bit grey scaled to 0-255, not clipped; 'F' refused). Raises
  DataError (``skippable=True``) naming the file.
  """
  try:
    with Image.open(path) as image:
      width, height = image.size
      if min(width, height) > 2 * size:
        image.draft('RGB', (size, size))  # JPEG: decode directly at a reduced scale (much faster).
      image = _as_l_or_rgb(image, path)
      if width <= height:
        new_size = (size, int(size * height / width))
      else:
        new_size = (int(size * width / height), size)
      image = image.resize(new_size, Image.BILINEAR, reducing_gap=None)
      left = int(round((new_size[0] - size) / 2.0))
      top = int(round((new_size[1] - size) / 2.0))
      image = image.crop((left, top, left + size, top + size)).convert('RGB')
      return np.asarray(image, dtype=np.uint8)
  except DataError:
    raise
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise DataError(f'Cannot decode image {path}: {e}', skippable=True) from e
