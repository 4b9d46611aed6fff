r"""The paper's Figure 2, with numbers: what local-DP noise leaves of a real medical image.

For a chest X-ray and a fundus photograph (the bundled samples, see
dpjax/assets/samples/ATTRIBUTION.md) at beta = 1, 2, 4 it shows
  * the per-pixel Laplace release (`ldp.laplace_perturb`, what the paper describes),
  * the best denoising attack on that release (`visual_privacy.best_denoising_attack`),
  * the paper code's release (`ldp.brightness_shift`, one brightness offset per image),
each with PSNR/SSIM against the original and the epsilons with their relations.

  python -m experiments.ldp_figure --out=docs/figures/ldp_grid.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from collections.abc import Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from dpjax import ldp  # noqa: E402
from dpjax import visual_privacy  # noqa: E402

SAMPLES_DIR = Path(__file__).resolve().parent.parent / 'dpjax' / 'assets' / 'samples'
# (title, file, grayscale): a grayscale X-ray is fed to the RGB network as 3 equal channels;
# its release draws ONE noise value per grey pixel, copied to the channels (noising the copies
# independently would cost 3/beta per pixel, since an attacker averages them).
SAMPLES = (('Chest X-ray (pneumonia)', 'chest_xray_pneumonia.jpeg', True),
           ('Fundus photograph', 'fundus_retina.jpg', False))
BETAS = (1.0, 2.0, 4.0)
CELL_INCHES = 2.3
DPI = 100
ROWS_PER_SAMPLE = 3


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


def make_figure(out: Path, image_size: int = 224, seed: int = 0) -> Path:
  """Writes the grid to `out` (PNG) and returns the path."""
  originals = np.stack([load_sample(SAMPLES_DIR / name, image_size) for _, name, _ in SAMPLES])
  example_ids = np.arange(len(SAMPLES), dtype=np.int32)
  # One independent key per beta: the paper released three separate noisy datasets.
  keys = jax.random.split(jax.random.key(seed), len(BETAS))
  image_shape = originals.shape[1:]

  fig, axes = plt.subplots(ROWS_PER_SAMPLE * len(SAMPLES), 1 + len(BETAS),
                           figsize=(CELL_INCHES * (1 + len(BETAS)),
                                    CELL_INCHES * 1.15 * ROWS_PER_SAMPLE * len(SAMPLES)),
                           dpi=DPI, squeeze=False)
  for column, (beta, key) in enumerate(zip(BETAS, keys), start=1):
    shifted = np.asarray(ldp.brightness_shift(key, originals, beta, example_ids))
    offsets = np.asarray(ldp.brightness_offsets(key, beta, example_ids))
    for index, (_, _, grayscale) in enumerate(SAMPLES):
      row = ROWS_PER_SAMPLE * index
      original = originals[index]
      laplace = np.asarray(ldp.laplace_perturb(key, originals[index:index + 1], beta,
                                               example_ids[index:index + 1], grayscale=grayscale))
      laplace_eps = ldp.ldp_epsilon_report(beta, image_shape, 'laplace', grayscale=grayscale)
      unit = 'pixel' if grayscale else 'pixel value'

      attack = visual_privacy.best_denoising_attack(laplace[0], original, beta,
                                                    grayscale=grayscale)
      _show(axes[row, column], laplace[0],
            f"β={beta:g}: ε={laplace_eps['per_pixel_epsilon']:g}/{unit},\n"
            f"ε={laplace_eps['per_image_epsilon']:,.0f}/image",
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

  for index, (sample_name, _, _) in enumerate(SAMPLES):
    row = ROWS_PER_SAMPLE * index
    _show(axes[row, 0], originals[index], f'{sample_name}\noriginal', f'{image_size} px')
    _label(axes[row + 1, 0], 'Denoising attack on\nthe per-pixel release\n'
           '(median / Gaussian /\nWiener with known β;\nbest by PSNR; flat =\nconstant-image baseline)')
    _label(axes[row + 2, 0], "Paper's code:\none Laplace offset\nper image, clipped\n"
           '(brightness shift);\n|offset| ≥ 1 blanks any\nimage: P = exp(-1/β)')
  height, width, channels = image_shape
  fig.suptitle('Local DP on training images: per-pixel Laplace(β) on [0, 1] '
               f'(ε per image = {height * width:,}/β grey, {height * width * channels:,}/β colour, '
               f'{height}x{width}) vs the paper code\'s brightness shift', fontsize=9)
  fig.subplots_adjust(left=0.02, right=0.98, top=0.95, bottom=0.02, hspace=0.45, wspace=0.08)
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, format='png', dpi=DPI)
  plt.close(fig)
  return out


def figure_pixel_size() -> tuple[int, int]:
  """(width, height) in pixels of the PNG that `make_figure` writes."""
  columns, rows = 1 + len(BETAS), ROWS_PER_SAMPLE * len(SAMPLES)
  return (round(CELL_INCHES * columns * DPI), round(CELL_INCHES * 1.15 * rows * DPI))


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True, help='PNG file to write.')
  parser.add_argument('--image_size', type=int, default=224, help='Side of the square images.')
  parser.add_argument('--seed', type=int, default=0, help='Seed of the LDP key.')
  args = parser.parse_args(argv)
  if args.image_size < 16:
    parser.error(f'Expected --image_size >= 16 (SSIM needs an 11px window), got {args.image_size}')
  print(f'wrote {make_figure(Path(args.out), args.image_size, args.seed)}')
  for variant in ldp.VARIANTS:
    for beta in BETAS:
      for grayscale in ((True, False) if variant == 'laplace' else (False,)):
        print(ldp.format_ldp_epsilon(ldp.ldp_epsilon_report(
            beta, (args.image_size,) * 2 + (3,), variant, grayscale=grayscale)))


if __name__ == '__main__':
  main(sys.argv[1:])
