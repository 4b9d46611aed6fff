"""Built-in synthetic demo data, written in the same on-disk layouts as the real downloads.

The demo sets let every command run end to end without the Kaggle downloads. They are
generated deterministically from a seed and then read through exactly the same code path
as the real data (:mod:`dpjax.data.folders` -> TFDS preparation -> data source):

* ``pneumonia``: ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``, grayscale JPEGs
  of a bright thorax with dark lung fields, ribs and spine; PNEUMONIA adds patchy bright
  opacities (consolidation) inside the lung fields. Kermany-style file names with several
  films per patient, as in the real set (the patient is the privacy unit):
  NORMAL ``IM-<patient:04d>-<k:04d>.jpeg`` (mostly 1 film, some 2-3) and PNEUMONIA
  ``person<patient>_<bacteria|virus>_<image number>.jpeg`` (1-4 films, mean about 2). A
  patient's films sit in one split folder and one class; they share the anatomy (drawn from a
  per-patient generator) and differ in framing, exposure, noise and opacities (per film).
* ``aptos``: ``train.csv`` (``id_code,diagnosis``) and ``train_images/<id_code>.png``, RGB
  fundus photographs: orange-red disc on black, optic disc, macula, vessels; the diabetic
  retinopathy grade (0-4) raises the number of microaneurysms / haemorrhages (dark red dots)
  and exudates (yellow spots), and grade 4 adds tortuous new vessels near the optic disc.

Class proportions follow the real data sets (pneumonia train 74% PNEUMONIA, test 62.5%,
val 8/8; APTOS grades about 49/10/27/5/8 %). Lesion strength, anatomy, exposure and noise
vary per image so the task is learnable but not trivial.

This is public synthetic data, so seeded NumPy ``Generator``s are used (one per image, and
for the pneumonia anatomy one per patient, derived from the seed and the image's / patient's
place in the set, so images do not depend on generation order).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from concurrent import futures
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dpjax.data import datasets
from dpjax.data.datasets import DATASETS

DEMO_VERSION = 3  # 2: pneumonia patients with several films each; 3: signals a small CNN learns.
MANIFEST_NAME = 'dpjax_demo_manifest.json'
DEMO_SEED = 0  # The demo data are one fixed data set, like the real ones; --seed only picks splits.

# Real class counts, used to give the demo the same imbalance.
_PNEUMONIA_REAL = {'train': (1341, 3875), 'val': (8, 8), 'test': (234, 390)}  # (NORMAL, PNEUMONIA)
_APTOS_REAL = (1805, 370, 999, 193, 295)  # grades 0..4 of the 3,662 labelled images

# Demo sizes: small enough for a full demo training run on 2 CPU cores.
PNEUMONIA_DEMO_SIZES = {'train': 800, 'val': 16, 'test': 240}
APTOS_DEMO_SIZE = 800

IMAGE_HEIGHT = 256  # Shorter side of every demo image.

# Films per patient (1, 2, 3, 4) in the pneumonia demo: NORMAL mean 1.3, PNEUMONIA mean 2.0.
PNEUMONIA_FILMS_PER_PATIENT = {0: (0.75, 0.2, 0.05, 0.0), 1: (0.4, 0.3, 0.2, 0.1)}


def proportional_counts(total: int, weights: Sequence[float]) -> list[int]:
  """Integer counts summing to ``total`` in proportion to ``weights`` (largest remainder)."""
  weights = np.asarray(weights, dtype=np.float64)
  exact = total * weights / weights.sum()
  counts = np.floor(exact).astype(int)
  for i in np.argsort(-(exact - counts), kind='stable')[: total - counts.sum()]:
    counts[i] += 1
  return counts.tolist()


def demo_class_counts(dataset: str) -> dict[str, list[int]]:
  """Images per class per split of the demo set, e.g. ``{'train': [206, 594], ...}``."""
  if dataset == 'pneumonia':
    return {split: proportional_counts(n, _PNEUMONIA_REAL[split])
            for split, n in PNEUMONIA_DEMO_SIZES.items()}
  if dataset == 'aptos':
    return {'train': proportional_counts(APTOS_DEMO_SIZE, _APTOS_REAL)}
  raise ValueError(f'Unknown demo dataset {dataset!r}; expected one of {DATASETS}')


def ensure_demo_data(dataset: str, cache_dir: str | os.PathLike | None = None, seed: int = DEMO_SEED) -> Path:
  """Generates the demo data set once and returns its folder (the ``data_dir`` to load).

  Args:
    dataset: 'pneumonia' or 'aptos'.
    cache_dir: cache root; the set goes to ``<cache_dir>/demo/<dataset>-v<DEMO_VERSION>-seed<seed>``.
      Defaults to ``$DPJAX_CACHE`` or ``~/.cache/dpjax``.
    seed: generation seed; the same seed gives byte-identical files.

  Returns:
    The folder, laid out like the real download (pneumonia: it contains ``chest_xray/``;
    aptos: it contains ``train.csv`` and ``train_images/``).

  Idempotent and safe against interrupted or concurrent runs: files are written to a
  temporary folder that is renamed into place (atomically) only once complete, with a
  manifest; an existing folder with a matching manifest is reused as is.
  """
  if dataset not in DATASETS:
    raise ValueError(f'Unknown demo dataset {dataset!r}; expected one of {DATASETS}')
  root = Path(cache_dir) if cache_dir else datasets.default_cache_root()
  final = root / 'demo' / f'{dataset}-v{DEMO_VERSION}-seed{seed}'
  if _is_complete(final, dataset, seed):
    return final
  final.parent.mkdir(parents=True, exist_ok=True)
  if final.exists():  # Left over by something else (no valid manifest): rebuild it.
    shutil.rmtree(final)
  tmp = Path(tempfile.mkdtemp(prefix=f'.{final.name}-', dir=final.parent))
  try:
    write_demo_data(dataset, tmp, seed)
    try:
      os.rename(tmp, final)
    except OSError:
      if not _is_complete(final, dataset, seed):  # Not a concurrent writer that won: a real error.
        raise
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return final


def _is_complete(folder: Path, dataset: str, seed: int) -> bool:
  try:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
  except (OSError, ValueError):
    return False
  return manifest.get('dataset') == dataset and manifest.get('seed') == seed and (
      manifest.get('version') == DEMO_VERSION)


def write_demo_data(dataset: str, out_dir: str | os.PathLike, seed: int,
                    class_counts: Mapping[str, Sequence[int]] | None = None) -> None:
  """Writes a demo set into ``out_dir`` (no caching); ``class_counts`` overrides the sizes."""
  out_dir = Path(out_dir)
  class_counts = dict(class_counts or demo_class_counts(dataset))
  if dataset == 'pneumonia':
    files = _write_pneumonia(out_dir, seed, class_counts)
  elif dataset == 'aptos':
    files = _write_aptos(out_dir, seed, class_counts['train'])
  else:
    raise ValueError(f'Unknown demo dataset {dataset!r}; expected one of {DATASETS}')
  manifest = {'dataset': dataset, 'seed': seed, 'version': DEMO_VERSION,
              'class_counts': {k: list(v) for k, v in class_counts.items()}, 'num_files': files}
  (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + '\n')


def _image_rng(seed: int, *stream: int) -> np.random.Generator:
  return np.random.default_rng([seed, *stream])


def _parallel_write(jobs: list, write_one) -> None:
  # PIL and NumPy release the GIL for most of the work, so threads give a real speed-up.
  with futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
    for _ in pool.map(write_one, jobs):
      pass


# ---------------------------------------------------------------------------- pneumonia

_SPLIT_CODES = {'train': 0, 'val': 1, 'test': 2}


def patient_film_counts(seed: int, split: str, label: int, num_images: int) -> list[int]:
  """Films per patient for one split folder and class: drawn from PNEUMONIA_FILMS_PER_PATIENT,
  the last patient cut short so that the films sum to exactly ``num_images``."""
  rng = _image_rng(seed, 0, 3, _SPLIT_CODES[split], label)
  sizes: list[int] = []
  while sum(sizes) < num_images:
    size = int(rng.choice(4, p=PNEUMONIA_FILMS_PER_PATIENT[label])) + 1
    sizes.append(min(size, num_images - sum(sizes)))
  return sizes


def _write_pneumonia(out_dir: Path, seed: int, class_counts: Mapping[str, Sequence[int]]) -> int:
  jobs = []
  next_patient = {0: 1, 1: 1}  # Patient numbers per class, unique across the split folders.
  image_number = 1  # PNEUMONIA names end in a running image number, as in Kermany.
  for split, (num_normal, num_pneumonia) in class_counts.items():
    for label, num in ((0, num_normal), (1, num_pneumonia)):
      folder = out_dir / 'chest_xray' / split / ('NORMAL', 'PNEUMONIA')[label]
      folder.mkdir(parents=True, exist_ok=True)
      for films in patient_film_counts(seed, split, label, num):
        patient = next_patient[label]
        next_patient[label] += 1
        kind = ('bacteria', 'virus')[int(_image_rng(seed, 0, 4, patient).random() < 1 / 3)]
        for k in range(1, films + 1):
          if label == 0:
            name = f'IM-{patient:04d}-{k:04d}.jpeg'
          else:
            name = f'person{patient}_{kind}_{image_number}.jpeg'
            image_number += 1
          jobs.append((folder / name, label, patient, k))

  def write_one(job):
    path, label, patient, k = job
    Image.fromarray(pneumonia_film(seed, label, patient, k), mode='L').save(path, format='JPEG', quality=90)

  _parallel_write(jobs, write_one)
  return len(jobs)


def pneumonia_film(seed: int, label: int, patient: int, k: int, lung_mask: bool = False):
  """Film ``k`` (1, 2, ...) of pneumonia-demo patient ``patient`` (numbered from 1 per class
  across the split folders, as in the file names) of class ``label``: the pixels written to
  its JPEG (see `render_chest_xray`, also for ``lung_mask``)."""
  return render_chest_xray(_image_rng(seed, 0, 5, label, patient), label,
                           film_rng=_image_rng(seed, 0, 6, label, patient, k), lung_mask=lung_mask)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
  """Low-frequency noise in about [-1, 1]: a coarse random grid upsampled bicubically."""
  coarse = rng.standard_normal((cells, max(2, round(cells * width / height)))).astype(np.float32)
  return np.asarray(Image.fromarray(coarse, mode='F').resize((width, height), Image.BICUBIC))


def _pixel_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """Zero-mean, unit-variance uniform noise; random bytes are ~20x faster to draw than normals."""
  raw = np.frombuffer(rng.bytes(int(np.prod(shape))), np.uint8).reshape(shape)
  return (raw.astype(np.float32) - 127.5) * np.float32(1 / 73.9)


def _soft_inside(dx: np.ndarray, dy: np.ndarray, softness: float) -> np.ndarray:
  """1 inside the unit circle of (dx, dy), 0 outside, with a smooth edge of the given width."""
  distance = np.sqrt(dx * dx + dy * dy)
  return 1.0 / (1.0 + np.exp(np.minimum((distance - 1.0) * np.float32(1 / softness), 50.0)))


def _upsample(image: np.ndarray, height: int, width: int) -> np.ndarray:
  return np.array(Image.fromarray(np.ascontiguousarray(image, np.float32), mode='F').resize(
      (width, height), Image.BILINEAR))


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  y = np.arange(height, dtype=np.float32)[:, None]
  x = np.arange(width, dtype=np.float32)[None, :]
  return np.broadcast_to(y, (height, width)), np.broadcast_to(x, (height, width))


def render_chest_xray(rng: np.random.Generator, label: int,
                      film_rng: np.random.Generator | None = None, lung_mask: bool = False):
  """One synthetic frontal chest X-ray (uint8, H=256, W about 270-330); label 1 = pneumonia.

  ``rng`` draws the patient's anatomy (thorax, lungs, heart, ribs, spine); ``film_rng`` draws
  what changes from film to film (width, centring, exposure, noise, opacities). Films of one
  patient: the same anatomy generator state, a fresh film generator each. Without
  ``film_rng``, ``rng`` draws everything (one film of one patient). With ``lung_mask``, returns
  ``(pixels, mask)``: the bool mask of the lung fields (where consolidation can show), the same
  pixels either way.
  """
  film = rng if film_rng is None else film_rng
  full_height, full_width = IMAGE_HEIGHT, int(film.integers(270, 331))
  # Anatomy and opacities are smooth: render them at half resolution, upsample, then add noise.
  height, width = full_height // 2, full_width // 2
  y, x = _grid(height, width)
  cx = np.float32(film.normal(0.0, 0.03))
  y = y * np.float32(1 / height)  # 0 (top) .. 1 (bottom)
  x = (x - np.float32(width / 2)) * np.float32(1 / height) - cx  # centred on the patient

  # Thorax: a bright rounded trunk; position and size vary per patient.
  thorax = _soft_inside(x * (1 / rng.uniform(0.48, 0.56)), (y - 0.62) * (1 / rng.uniform(0.55, 0.65)), 0.04)
  image = 0.08 + thorax * rng.uniform(0.55, 0.7)

  # Lung fields: two dark ellipses; the heart (patient's left = image right) bulges into the left one.
  lung_dx, lung_y = rng.uniform(0.19, 0.24), rng.uniform(0.45, 0.5)
  inv_a, inv_b = 1 / rng.uniform(0.13, 0.16), 1 / rng.uniform(0.24, 0.29)
  lung_v = (y - lung_y) * inv_b
  right_lung = _soft_inside((x + lung_dx) * inv_a, lung_v, 0.06)
  left_lung = _soft_inside((x - lung_dx) * inv_a, lung_v, 0.06)
  heart = _soft_inside((x - 0.08) * (1 / rng.uniform(0.12, 0.16)), (y - 0.66) * (1 / 0.13), 0.08)
  lungs = np.minimum(right_lung + left_lung * (1 - 0.8 * heart), 1.0)
  image -= lungs * rng.uniform(0.38, 0.5)

  # Ribs: periodic bands curving down laterally, clearest over the lungs; spine in the middle.
  spacing = rng.uniform(0.075, 0.09)
  phase = (y - 2.2 * x * x - rng.uniform(0, spacing)) * (2 * np.pi / spacing)
  ribs = ((1 + np.cos(phase)) * 0.5) ** 6
  image += thorax * ribs * (rng.uniform(0.07, 0.13) * (0.25 + 0.75 * lungs))
  spine = np.exp(-np.square(x * (1 / rng.uniform(0.03, 0.045)))) * thorax
  image += spine * rng.uniform(0.12, 0.2)

  # Exposure, contrast (gamma) and noise level, drawn before the label-dependent draws so that
  # the same generator state gives the same film with and without consolidation.
  gamma, gain, offset = film.uniform(0.8, 1.25), film.uniform(0.85, 1.1), film.uniform(-0.04, 0.04)
  noise_level = film.uniform(0.015, 0.04)

  # Consolidation (label 1): large, dense, patchy opacities filling part of one or both lung
  # fields, often with air bronchograms (dark branching airways inside the white). Where the
  # disease sits is the patient's (drawn from ``rng``); its density, patchiness and a small
  # shift are the film's. Normal films sometimes show one small faint shadow (label noise for
  # the eye, not for the label). All label-dependent draws come last, so that the same generator
  # state gives the same film with and without consolidation.
  opacity = _consolidation(rng, film, x, y, lung_dx, lung_y, label, centre_col=width / 2 + cx * height)
  image += opacity * lungs

  image = np.clip(image, 0.0, 1.0) ** gamma * gain + offset
  image = _upsample(image, full_height, full_width)
  image += _pixel_noise(film, image.shape) * noise_level  # Quantum noise.
  pixels = (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
  if lung_mask:
    return pixels, _upsample(lungs, full_height, full_width) > 0.5
  return pixels


def _consolidation(rng: np.random.Generator, film: np.random.Generator, x: np.ndarray, y: np.ndarray,
                   lung_dx: float, lung_y: float, label: int, centre_col: float) -> np.ndarray:
  """The brightness added to the lung fields (before the lung mask): consolidation or a shadow.

  ``x``, ``y``: the film's coordinates in units of its height, x = 0 at pixel column ``centre_col``.
  """
  height, width = x.shape
  regions = []  # (centre x, centre y, half width, half height, air bronchogram)
  if label == 1:
    # Regions: 1 (50%), 2 (35%) or 3; the first one's side at random, each further one on the
    # other side with probability 1/2 (bilateral pneumonia).
    num_regions = int(rng.choice(3, p=(0.5, 0.35, 0.15))) + 1
    first_side = 1.0 if rng.random() < 0.5 else -1.0
    for i in range(num_regions):
      side = first_side if (i == 0 or rng.random() < 0.5) else -first_side
      regions.append((side * lung_dx + rng.normal(0, 0.025), lung_y + rng.uniform(-0.1, 0.15),
                      rng.uniform(0.09, 0.15), rng.uniform(0.12, 0.2), rng.random() < 0.6))
    density = film.uniform(0.4, 0.65)  # Film to film: how dense the opacity looks.
  else:
    if rng.random() < 0.3:  # A faint, small shadow (vessel crowding, a nipple, a scar).
      side = 1.0 if rng.random() < 0.5 else -1.0
      regions.append((side * lung_dx + rng.normal(0, 0.03), lung_y + rng.uniform(-0.1, 0.15),
                      rng.uniform(0.03, 0.055), rng.uniform(0.03, 0.055), False))
    density = film.uniform(0.05, 0.13)
  # Patchy: denser cores and thinner (ground-glass) parts, different on every film.
  patches = np.clip(0.85 + 0.3 * _smooth_noise(film, height, width, 12), 0.45, 1.15)
  opacity = np.zeros_like(x)
  for px, py, a, b, bronchogram in regions:
    px, py = px + film.normal(0, 0.01), py + film.normal(0, 0.01)
    region = _soft_inside((x - px) * np.float32(1 / a), (y - py) * np.float32(1 / b), 0.18)
    if bronchogram:
      region = region * (1.0 - 0.6 * _airways(film, height, width, centre_col, px, py, a, b))
    opacity = np.maximum(opacity, region)
  return (density * np.minimum(opacity * patches, 1.0)).astype(np.float32)


def _airways(film: np.random.Generator, height: int, width: int, centre_col: float, px: float,
             py: float, a: float, b: float) -> np.ndarray:
  """Air bronchograms: dark branching tubes (1 = air) running down and out through an opacity
  centred at (px, py) with half axes (a, b)."""
  mask = Image.new('L', (width, height), 0)
  draw = ImageDraw.Draw(mask)
  side = 1.0 if px > 0 else -1.0
  for _ in range(int(film.integers(2, 4))):
    start = (centre_col + (px - side * 0.6 * a + film.normal(0, 0.2 * a)) * height,
             (py - 0.7 * b + film.normal(0, 0.15 * b)) * height)
    angle = np.arctan2(1.0, side * film.uniform(0.1, 0.7))  # Down and outwards.
    path = _random_walk(film, start, angle, 7, 0.035 * height, 0.15)
    draw.line(path, fill=255, width=2)
    branch = _random_walk(film, path[int(film.integers(2, 5))], angle + side * film.uniform(0.4, 0.8), 4,
                          0.03 * height, 0.2)
    draw.line(branch, fill=255, width=1)
  return np.asarray(mask.filter(ImageFilter.GaussianBlur(0.6)), np.float32) * np.float32(1 / 255)


# ---------------------------------------------------------------------------- APTOS

def aptos_labels(seed: int, grade_counts: Sequence[int]) -> tuple[np.ndarray, list[str]]:
  """The APTOS demo's grades and id codes in CSV order (image ``index`` = row)."""
  labels = np.repeat(np.arange(len(grade_counts)), grade_counts)
  order_rng = _image_rng(seed, 1, 0)
  labels = labels[order_rng.permutation(len(labels))]  # Grades mixed in the CSV, as in the real one.
  id_codes: list[str] = []
  seen = set()
  while len(id_codes) < len(labels):
    code = order_rng.bytes(6).hex()
    if code not in seen:
      seen.add(code)
      id_codes.append(code)
  return labels, id_codes


def aptos_image(seed: int, index: int, grade: int, lesion_mask: bool = False):
  """The pixels of APTOS-demo image ``index`` (its CSV row) of the given grade, as written."""
  return render_fundus(_image_rng(seed, 1, 1, index), grade, lesion_mask=lesion_mask)


def _write_aptos(out_dir: Path, seed: int, grade_counts: Sequence[int]) -> int:
  labels, id_codes = aptos_labels(seed, grade_counts)
  (out_dir / 'train_images').mkdir(parents=True, exist_ok=True)
  with open(out_dir / 'train.csv', 'w', newline='') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(['id_code', 'diagnosis'])
    writer.writerows(zip(id_codes, labels.tolist()))

  def write_one(job):
    index, code, grade = job
    pixels = aptos_image(seed, index, grade)
    Image.fromarray(pixels, mode='RGB').save(out_dir / 'train_images' / f'{code}.png', compress_level=1)

  _parallel_write(list(zip(range(len(labels)), id_codes, labels.tolist())), write_one)
  return len(labels)


def _random_walk(rng: np.random.Generator, start, angle: float, steps: int, step: float,
                 wiggle: float) -> list[tuple[float, float]]:
  points = [tuple(start)]
  px, py = start
  for _ in range(steps):
    angle += rng.normal(0, wiggle)
    px, py = px + step * np.cos(angle), py + step * np.sin(angle)
    points.append((px, py))
  return points


# Lesion counts per DR grade, (low, high) for rng.integers: microaneurysms (small dark-red
# dots), blot / flame haemorrhages (larger dark-red patches), hard exudates (yellow, in clusters),
# cotton-wool spots (pale, fluffy). Neighbouring grades overlap; grade 4 (proliferative) has the
# lesions of grade 3 plus neovascularisation and, in most eyes, a large pre-retinal haemorrhage.
FUNDUS_LESIONS = {
    0: {'dots': (0, 1), 'blots': (0, 1), 'exudates': (0, 1), 'cotton': (0, 1)},
    1: {'dots': (3, 9), 'blots': (0, 1), 'exudates': (0, 1), 'cotton': (0, 1)},
    2: {'dots': (6, 15), 'blots': (2, 7), 'exudates': (4, 13), 'cotton': (0, 2)},
    3: {'dots': (10, 21), 'blots': (10, 23), 'exudates': (12, 31), 'cotton': (1, 5)},
    4: {'dots': (10, 21), 'blots': (8, 21), 'exudates': (10, 29), 'cotton': (1, 5)},
}


def render_fundus(rng: np.random.Generator, grade: int, lesion_mask: bool = False):
  """One synthetic colour fundus photograph (uint8 RGB, H=256, W 256-336), DR grade 0-4.

  With ``lesion_mask``, returns ``(pixels, mask)``: the bool mask of the DR lesions
  (haemorrhages, exudates, cotton-wool spots, new vessels), the same pixels either way.
  """
  full_height, full_width = IMAGE_HEIGHT, int(rng.integers(256, 337))
  # Everything but the sensor noise is rendered at half resolution, then upsampled (4x cheaper).
  height, width = full_height // 2, full_width // 2
  cx, cy = width / 2 + rng.normal(0, 1.5), height / 2 + rng.normal(0, 1.5)
  radius = height * rng.uniform(0.46, 0.52)  # Sometimes clipped at top and bottom, as in APTOS.
  y, x = _grid(height, width)
  x, y = (x - np.float32(cx)) * np.float32(1 / radius), (y - np.float32(cy)) * np.float32(1 / radius)
  inside = _soft_inside(x, y, 0.01)

  # Optic disc (left or right eye) and the darker macula on the other side; uneven illumination.
  eye = 1.0 if rng.random() < 0.5 else -1.0
  od_x, od_y = eye * rng.uniform(0.3, 0.4), rng.normal(0, 0.04)
  od_r = rng.uniform(0.08, 0.11)
  optic = _soft_inside((x - od_x) * (1 / od_r), (y - od_y) * (1 / od_r), 0.12)
  macula_x = -eye * 0.05
  macula = np.exp(-(np.square(x - macula_x) + y * y) * (1 / (2 * 0.1 ** 2)))
  shade = (1.0 - 0.45 * (x * x + y * y)) * (1 + 0.08 * _smooth_noise(rng, height, width, 6)) * (1 - 0.3 * macula)

  # Masks: vessels (R), red lesions (G), exudates (B); new vessels and cotton-wool spots apart.
  masks = Image.new('RGB', (width, height), 0)
  draw = ImageDraw.Draw(masks)
  extra = Image.new('RGB', (width, height), 0)  # R: new vessels, G: cotton-wool spots.
  draw_extra = ImageDraw.Draw(extra)
  to_pixels = lambda px, py: (cx + px * radius, cy + py * radius)
  disc_centre = to_pixels(od_x, od_y)
  toward = np.pi if eye > 0 else 0.0
  for base_angle in (toward - 0.9, toward + 0.9, toward + np.pi - 0.7, toward + np.pi + 0.7):
    path = _random_walk(rng, disc_centre, base_angle + rng.normal(0, 0.15), 24, radius * 0.05, 0.12)
    draw.line(path, fill=(255, 0, 0), width=2)
    for k in rng.choice(np.arange(5, 20), size=2, replace=False):
      branch = _random_walk(rng, path[k], base_angle + rng.choice([-0.8, 0.8]), 10, radius * 0.045, 0.2)
      draw.line(branch, fill=(170, 0, 0), width=1)

  def spot(px, py, size, fill, target=draw, elongation=(0.7, 1.3)):
    sx, sy = to_pixels(px, py)
    target.ellipse((sx - size, sy - size * rng.uniform(*elongation), sx + size, sy + size), fill=fill)

  def anywhere(max_r=0.85):  # A point of the retina, not on the optic disc.
    while True:
      rr, theta = max_r * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
      px, py = rr * np.cos(theta), rr * np.sin(theta)
      if (px - od_x) ** 2 + (py - od_y) ** 2 > (1.5 * od_r) ** 2:
        return px, py

  # Lesions: counts grow with the grade (sizes in half-resolution pixels).
  counts = {kind: int(rng.integers(*bounds)) for kind, bounds in FUNDUS_LESIONS[grade].items()}
  for _ in range(counts['dots']):  # Microaneurysms.
    spot(*anywhere(), rng.uniform(1.5, 2.4), (0, 255, 0))
  for _ in range(counts['blots']):  # Blot and flame haemorrhages.
    spot(*anywhere(), rng.uniform(2.5, 5.0), (0, 255, 0), elongation=(0.5, 1.5))
  if counts['exudates']:  # Hard exudates: yellow spots in clusters, often around the macula.
    clusters = [(macula_x + rng.normal(0, 0.2), rng.normal(0, 0.2)) if rng.random() < 0.5 else anywhere(0.7)
                for _ in range(int(rng.integers(1, 4)))]
    for i in range(counts['exudates']):
      ox, oy = clusters[i % len(clusters)]
      spot(ox + rng.normal(0, 0.09), oy + rng.normal(0, 0.09), rng.uniform(1.5, 3.2), (0, 0, 255))
  for _ in range(counts['cotton']):  # Cotton-wool spots: soft, pale, larger.
    spot(*anywhere(0.6), rng.uniform(4.0, 6.5), (0, 255, 0), target=draw_extra)
  if grade == 4:
    # Neovascularisation: tufts of fine tortuous new vessels at the disc and elsewhere.
    for t in range(int(rng.integers(2, 5))):
      centre = (od_x + rng.normal(0, od_r), od_y + rng.normal(0, od_r)) if t < 2 else anywhere(0.7)
      for _ in range(int(rng.integers(5, 9))):
        start = to_pixels(centre[0] + rng.normal(0, 0.04), centre[1] + rng.normal(0, 0.04))
        walk = _random_walk(rng, start, rng.uniform(0, 2 * np.pi), 12, radius * 0.022, 1.0)
        draw_extra.line(walk, fill=(255, 0, 0), width=1)
    if rng.random() < 0.7:  # Pre-retinal haemorrhage: a large dark boat-shaped pool.
      px, py = anywhere(0.6)
      spot(px, py, rng.uniform(8.0, 14.0), (0, 255, 0), elongation=(0.5, 0.8))
  masks = np.asarray(masks, np.float32) * np.float32(1 / 255)
  vessel, red, yellow = masks[..., 0], masks[..., 1], masks[..., 2]
  new_vessels = np.asarray(extra.getchannel(0).filter(ImageFilter.GaussianBlur(0.5)), np.float32) * np.float32(1 / 255)
  cotton = np.asarray(extra.getchannel(1).filter(ImageFilter.GaussianBlur(1.5)), np.float32) * np.float32(1 / 255)

  # Compose each colour channel: orange-red retina, bright disc, dark vessels and red lesions,
  # bright red new vessels, yellow exudates, pale cotton-wool spots.
  base = (rng.uniform(0.72, 0.92), rng.uniform(0.28, 0.45), rng.uniform(0.08, 0.18))
  exposure = rng.uniform(0.8, 1.15)
  # Sensor noise at half resolution: upsampled, it stays fine-grained but PNG-compressible.
  noise = _pixel_noise(rng, (height, width)) * rng.uniform(0.01, 0.025)
  channels = []
  for c, (disc_add, vessel_dim, red_dim, exudate, new_vessel, wool) in enumerate(
      ((0.25, 0.35, 0.6, 0.98, 0.7, 0.95), (0.45, 0.6, 0.85, 0.88, 0.08, 0.88),
       (0.3, 0.55, 0.75, 0.3, 0.08, 0.75))):
    value = (base[c] * shade + disc_add * optic) * (1 - vessel_dim * vessel) * (1 - red_dim * red)
    value += (new_vessel - value) * new_vessels
    value += (exudate - value) * yellow
    value += (wool - value) * (0.8 * cotton)
    channels.append(np.clip(value * exposure + noise, 0.0, 1.0) * inside)
  small = Image.fromarray((np.stack(channels, axis=-1) * 255 + 0.5).astype(np.uint8), mode='RGB')
  pixels = np.asarray(small.resize((full_width, full_height), Image.BICUBIC))
  if lesion_mask:
    lesions = np.maximum.reduce([red, yellow, new_vessels, cotton]) * inside
    return pixels, _upsample(lesions, full_height, full_width) > 0.5
  return pixels
