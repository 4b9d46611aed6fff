r"""The paper's Figure 2, with numbers: what local-DP noise leaves of a real medical image.

For a chest X-ray and a fundus photograph (the bundled samples, see
dpjax/assets/samples/ATTRIBUTION.md) at beta = 1, 2, 4 it shows
  * the per-pixel Laplace release (`ldp.laplace_perturb`, what the paper describes),
  * the best denoising attack on that release (`visual_privacy.best_denoising_attack`),
  * the paper code's release (`ldp.brightness_shift`, one brightness offset per image),
each with PSNR/SSIM against the original and the epsilons with their relations.

The X-ray is grey: its release draws ONE noise value per grey pixel (d = H*W values per image);
the fundus photograph is colour: one per pixel value (d = H*W*3). Next to the PNG a JSON
sidecar (`sidecar_path`: same name, .json) records the LDP mechanism the figure was drawn with
(`mechanism_variant`) and the epsilons it states (`epsilon_texts`); the test of this module
fails when the committed figure no longer matches the code. To regenerate the README's figure:

  python -m experiments.ldp_figure --out=docs/figures/ldp_grid.png
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import matplotlib.text  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from dpjax import ldp  # noqa: E402
from dpjax import visual_privacy  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLES_DIR = REPO / 'dpjax' / 'assets' / 'samples'
COMMITTED_FIGURE = REPO / 'docs' / 'figures' / 'ldp_grid.png'  # The README's; --out only.
# (title, file, grayscale): a grayscale X-ray is fed to the RGB network as 3 equal channels;
# its release draws ONE noise value per grey pixel, copied to the channels (noising the copies
# independently would cost 3/beta per pixel, since an attacker averages them).
SAMPLES = (('Chest X-ray (pneumonia)', 'chest_xray_pneumonia.jpeg', True),
           ('Fundus photograph', 'fundus_retina.jpg', False))
SHORT_NAMES = ('X-ray', 'fundus')  # In the suptitle.
BETAS = (1.0, 2.0, 4.0)
CELL_INCHES = 2.3
DPI = 100
ROWS_PER_SAMPLE = 3
TITLE_INCHES = 0.6  # Three lines of suptitle above the grid.
SIDECAR_VERSION = 1
PROBE_BETA = 0.02  # Noise small enough that the structure probe's release is rarely clipped.


def load_sample(path: Path, image_size: int) -> np.ndarray:
  """RGB float [image_size, image_size, 3] in [0, 1]: shorter side resized, then centre crop."""
  image = Image.open(path).convert('RGB')  # Grayscale X-rays become 3 equal channels, as in training.
  scale = image_size / min(image.size)
  resized = image.resize((max(image_size, round(image.width * scale)),
                          max(image_size, round(image.height * scale))), Image.BICUBIC)
  left = (resized.width - image_size) // 2
  top = (resized.height - image_size) // 2
  cropped = resized.crop((left, top, left + image_size, top + image_size))
  return np.asarray(cropped, np.float32) / 255.0


def _caption(image, original) -> str:
  return (f'PSNR {visual_privacy.psnr(image, original):.1f} dB, '
          f'SSIM {visual_privacy.ssim(image, original):.2f}')


def _show(ax, image, title: str, caption: str) -> None:
  ax.imshow(np.clip(image, 0.0, 1.0), interpolation='nearest')
  ax.set_title(title, fontsize=8)
  ax.set_xlabel(caption, fontsize=8)
  ax.set_xticks([])
  ax.set_yticks([])


def _label(ax, text: str) -> None:
  ax.axis('off')
  ax.text(0.5, 0.5, text, ha='center', va='center', fontsize=9, wrap=True,
          transform=ax.transAxes)


def _shape_text(shape: Sequence[int]) -> str:
  return 'x'.join(str(s) for s in shape)


def epsilon_reports(image_size: int) -> dict[tuple[int, float], dict]:
  """{(sample index, beta): `ldp.ldp_epsilon_report`} of the per-pixel release of each sample."""
  return {(index, beta): ldp.ldp_epsilon_report(beta, (image_size, image_size, 3), 'laplace',
                                                grayscale=grayscale)
          for index, (_, _, grayscale) in enumerate(SAMPLES) for beta in BETAS}


def epsilon_texts(image_size: int) -> dict[str, Any]:
  """Every epsilon the figure states, as drawn: the suptitle, the originals' titles and the
  per-pixel release's column titles (keyed 'sample index/beta'), all from `ldp_epsilon_report`."""
  reports = epsilon_reports(image_size)
  originals, releases, counts = [], {}, []
  for index, (sample_name, _, grayscale) in enumerate(SAMPLES):
    report = reports[index, BETAS[0]]
    d = report['num_pixel_values']
    noised_shape = report['image_shape'][:-1] if grayscale else report['image_shape']
    what = 'grey pixel' if grayscale else 'pixel value'
    originals.append(f'{sample_name}, original\nd = {_shape_text(noised_shape)} = {d:,} '
                     + ('grey pixels' if grayscale else 'values'))
    counts.append(f'{"Grey" if grayscale else "Colour"} {SHORT_NAMES[index]}: one noise value '
                  f'per {what}, ε per image = d/β with d = {_shape_text(noised_shape)} = {d:,}')
    for beta in BETAS:
      report = reports[index, beta]
      releases[f'{index}/{beta:g}'] = (
          f"β={beta:g}: ε={report['per_pixel_epsilon']:g}/{what},\n"
          f"ε={report['per_image_epsilon']:,.0f} per {_shape_text(noised_shape)}"
          f"{' grey' if grayscale else ''} image")
  title = ('Local DP on training images: per-pixel discrete Laplace(β) on 8-bit levels '
           "vs the paper code's brightness shift\n" + '\n'.join(counts))
  return {'suptitle': title, 'originals': originals, 'releases': releases}


def _noise_structure(release: np.ndarray, original: np.ndarray) -> str:
  """How many independent noise values one released image [H, W, C] holds, read off it."""
  noise = (np.round(255 * release) - np.round(255 * original))[(release > 0) & (release < 1)]
  if noise.size and np.all(noise == noise[0]):  # Clipped values say nothing of the noise.
    return '1 (one offset per image)'
  if np.all(release == release[..., :1]):
    return 'H*W (one per grey pixel, copied to the C channels)'
  return 'H*W*C (one per pixel value)'


def mechanism_variant() -> dict[str, Any]:
  """What in `dpjax.ldp` the figure depends on: the mechanisms' qualified names, their key
  parameters, the exact per-pixel epsilon of each beta's noise table (a fingerprint of the
  noise distribution, `ldp.realized_pixel_epsilon`) and the noise structure each sample's
  release has, measured on a small probe image (one value per grey pixel, per pixel value or
  per image). Independent of the image size, the random bits and the plotting."""
  probe_size = 16  # The smallest --image_size.
  probe = np.stack([load_sample(SAMPLES_DIR / name, probe_size) for _, name, _ in SAMPLES])
  probe = 0.25 + 0.5 * probe  # Mid-range values: noise at PROBE_BETA is almost never clipped.
  probe = np.round(255 * probe) / 255
  example_ids = np.arange(len(SAMPLES), dtype=np.int32)
  key = jax.random.key(0)
  structure = {}
  # Called as `build_figure` calls them (same shapes at --image_size=16: compiled once).
  shifted = np.asarray(ldp.brightness_shift(key, probe, PROBE_BETA, example_ids))
  for index, (sample_name, _, grayscale) in enumerate(SAMPLES):
    laplace = np.asarray(ldp.laplace_perturb(key, probe[index:index + 1], PROBE_BETA,
                                             example_ids[index:index + 1], grayscale=grayscale))
    structure[sample_name] = {'grayscale': grayscale,
                              'laplace': _noise_structure(laplace[0], probe[index]),
                              'paper_brightness': _noise_structure(shifted[index], probe[index])}
  name = lambda f: f'{f.__module__}.{f.__qualname__}'
  return {
      'laplace': name(ldp.laplace_perturb),
      'paper_brightness': name(ldp.brightness_shift),
      'epsilon_report': name(ldp.ldp_epsilon_report),
      'levels': ldp.LEVELS,
      'scale_margins': list(ldp.SCALE_MARGINS),
      'beta_range': [ldp.MIN_BETA, ldp.MAX_BETA],
      # 12 digits: the noise table's fingerprint, above the platforms' last-ulp differences.
      'realized_pixel_epsilon': {f'{beta:g}': f'{ldp.realized_pixel_epsilon(beta):.12g}'
                                 for beta in BETAS},
      'noise_structure': structure,
  }


def sidecar_path(png: Path) -> Path:
  """The JSON written next to the PNG: `docs/figures/ldp_grid.png` -> `ldp_grid.json`."""
  return Path(png).with_suffix('.json')


def sidecar(png_bytes: bytes, image_size: int, seed: int) -> dict[str, Any]:
  """The record written next to the PNG (`sidecar_path`)."""
  return {'version': SIDECAR_VERSION,
          'command': (f'python -m experiments.ldp_figure --out=<png> --image_size={image_size} '
                      f'--seed={seed}'),
          'image_size': image_size, 'seed': seed, 'betas': list(BETAS),
          'png_sha256': hashlib.sha256(png_bytes).hexdigest(),
          'variant': mechanism_variant(),
          'epsilon_texts': epsilon_texts(image_size)}


def build_figure(image_size: int = 224, seed: int = 0):
  """The matplotlib figure of the grid (the caller closes it)."""
  originals = np.stack([load_sample(SAMPLES_DIR / name, image_size) for _, name, _ in SAMPLES])
  example_ids = np.arange(len(SAMPLES), dtype=np.int32)
  # One independent key per beta: the paper released three separate noisy datasets.
  keys = jax.random.split(jax.random.key(seed), len(BETAS))
  texts = epsilon_texts(image_size)
  width, height = figure_pixel_size()
  fig, axes = plt.subplots(ROWS_PER_SAMPLE * len(SAMPLES), 1 + len(BETAS),
                           figsize=(width / DPI, height / DPI), dpi=DPI, squeeze=False)
  for column, (beta, key) in enumerate(zip(BETAS, keys), start=1):
    shifted = np.asarray(ldp.brightness_shift(key, originals, beta, example_ids))
    offsets = np.asarray(ldp.brightness_offsets(key, beta, example_ids))
    for index, (_, _, grayscale) in enumerate(SAMPLES):
      row = ROWS_PER_SAMPLE * index
      original = originals[index]
      laplace = np.asarray(ldp.laplace_perturb(key, originals[index:index + 1], beta,
                                               example_ids[index:index + 1], grayscale=grayscale))
      if grayscale and not np.all(laplace[0] == laplace[0, ..., :1]):
        raise AssertionError('The grey release has unequal channels: the figure would state '
                             'an epsilon per grey pixel for a release of several values each')
      attack = visual_privacy.best_denoising_attack(laplace[0], original, beta,
                                                    grayscale=grayscale)
      _show(axes[row, column], laplace[0], texts['releases'][f'{index}/{beta:g}'],
            _caption(laplace[0], original))
      setting = attack['attacks'].get(attack['best_attack'], {}).get('setting')
      _show(axes[row + 1, column], attack['best_image'],
            f"β={beta:g}: best attack: {attack['best_attack']}"
            + (f' ({setting:g})' if setting is not None else ''),
            f"PSNR {attack['best_psnr']:.1f} dB (flat {attack['flat_baseline']['psnr']:.1f}), "
            f"SSIM {attack['best_ssim']:.2f}")
      _show(axes[row + 2, column], shifted[index],
            f'β={beta:g}: offset {offsets[index]:+.2f}, no image-level DP\n'
            f'(ε={1 / beta:g} for mean brightness only)',
            _caption(shifted[index], original))

  for index in range(len(SAMPLES)):
    row = ROWS_PER_SAMPLE * index
    _show(axes[row, 0], originals[index], texts['originals'][index], f'{image_size} px')
    _label(axes[row + 1, 0], 'Denoising attack on\nthe per-pixel release\n'
           '(median / Gaussian /\nWiener with known β;\nbest by PSNR; flat =\nconstant-image baseline)')
    _label(axes[row + 2, 0], "Paper's code:\none Laplace offset\nper image, clipped\n"
           '(brightness shift);\n|offset| ≥ 1 blanks any\nimage: P = exp(-1/β)')
  fig.suptitle(texts['suptitle'], fontsize=9, y=1 - 0.06 / (height / DPI), va='top')
  fig.subplots_adjust(left=0.02, right=0.98, top=1 - (TITLE_INCHES + 0.3) / (height / DPI),
                      bottom=0.02, hspace=0.45, wspace=0.08)
  return fig


def layout_problems(fig) -> list[str]:
  """The texts of `fig` (titles, labels, suptitle) cut at its edges or overlapping another."""
  fig.canvas.draw()  # Places the titles and axis labels.
  renderer = fig.canvas.get_renderer()
  canvas = fig.bbox
  texts = [(text.get_text(), text.get_window_extent(renderer))
           for text in fig.findobj(matplotlib.text.Text)
           if text.get_visible() and text.get_text().strip()]
  problems = [f'cut: {text!r}' for text, box in texts
              if (box.x0 < canvas.x0 - 0.5 or box.x1 > canvas.x1 + 0.5
                  or box.y0 < canvas.y0 - 0.5 or box.y1 > canvas.y1 + 0.5)]
  for i, (text, box) in enumerate(texts):
    for other, other_box in texts[i + 1:]:
      if box.overlaps(other_box):
        problems.append(f'overlap: {text!r} and {other!r}')
  return problems


def make_figure(out: Path, image_size: int = 224, seed: int = 0) -> Path:
  """Writes the grid to `out` (PNG) and its record to `sidecar_path(out)`; returns `out`."""
  fig = build_figure(image_size, seed)
  try:
    problems = layout_problems(fig)
    if problems:
      raise AssertionError('Texts of the figure do not fit: ' + '; '.join(problems))
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=DPI)
  finally:
    plt.close(fig)
  png = buffer.getvalue()
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  record = sidecar(png, image_size, seed)
  for path, data in ((out, png),
                     (sidecar_path(out), (json.dumps(record, indent=2, ensure_ascii=False)
                                          + '\n').encode())):
    partial = path.with_name(path.name + '.partial')
    partial.write_bytes(data)
    partial.replace(path)  # Nothing half-written under the real name.
  return out


def figure_pixel_size() -> tuple[int, int]:
  """(width, height) in pixels of the PNG that `make_figure` writes."""
  columns, rows = 1 + len(BETAS), ROWS_PER_SAMPLE * len(SAMPLES)
  return (round(CELL_INCHES * columns * DPI),
          round((CELL_INCHES * 1.15 * rows + TITLE_INCHES) * DPI))


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  # No default: the committed docs/figures/ldp_grid.png is only replaced when asked for.
  parser.add_argument('--out', required=True,
                      help=f'PNG file to write, and its .json sidecar next to it '
                           f'({COMMITTED_FIGURE.relative_to(REPO)} is the README\'s)')
  parser.add_argument('--image_size', type=int, default=224, help='Side of the square images.')
  parser.add_argument('--seed', type=int, default=0, help='Seed of the LDP key.')
  args = parser.parse_args(argv)
  if args.image_size < 16:
    parser.error(f'Expected --image_size >= 16 (SSIM needs an 11px window), got {args.image_size}')
  out = make_figure(Path(args.out), args.image_size, args.seed)
  print(f'wrote {out} and {sidecar_path(out)}')
  for variant in ldp.VARIANTS:
    for beta in BETAS:
      for grayscale in ((True, False) if variant == 'laplace' else (False,)):
        print(ldp.format_ldp_epsilon(ldp.ldp_epsilon_report(
            beta, (args.image_size,) * 2 + (3,), variant, grayscale=grayscale)))


if __name__ == '__main__':
  main(sys.argv[1:])
