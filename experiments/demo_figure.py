"""A grid of the built-in demo images, as the README shows them: what the demo's labels look like.

Rows: normal chest films, pneumonia films (consolidation in one or both lungs), then fundus
photographs of DR grades 0 to 4. The pixels are exactly those `experiments.demo_data` writes
(same seed, same renderer), at a reduced size.

  python -m experiments.demo_figure --out=docs/figures/demo_images.png
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from experiments import demo_data

CELL = 112  # Pixels per image in the figure.
LABEL_WIDTH = 150
PER_ROW = 6


def _cell(pixels: np.ndarray) -> np.ndarray:
  image = Image.fromarray(pixels).convert('RGB')
  side = min(image.size)  # Centre square, as the training crop sees it.
  left, top = (image.width - side) // 2, (image.height - side) // 2
  return np.asarray(image.crop((left, top, left + side, top + side)).resize((CELL, CELL), Image.BILINEAR))


def rows(per_row: int = PER_ROW, seed: int = demo_data.DEMO_SEED) -> list[tuple[str, list[np.ndarray]]]:
  """(row title, images) for the figure: demo patients 1..per_row, film 1; fundus images by grade."""
  out = [(title, [demo_data.pneumonia_film(seed, label, patient, 1) for patient in range(1, per_row + 1)])
         for title, label in (('chest: normal', 0), ('chest: pneumonia', 1))]
  labels, _ = demo_data.aptos_labels(seed, demo_data.demo_class_counts('aptos')['train'])
  for grade in range(5):
    indices = np.flatnonzero(labels == grade)[:per_row]
    out.append((f'fundus: DR grade {grade}',
                [demo_data.aptos_image(seed, int(i), grade) for i in indices]))
  return out


def render(per_row: int = PER_ROW) -> Image.Image:
  figure_rows = rows(per_row)
  canvas = Image.new('RGB', (LABEL_WIDTH + per_row * CELL, len(figure_rows) * CELL), 'white')
  draw = ImageDraw.Draw(canvas)
  for r, (title, images) in enumerate(figure_rows):
    draw.text((6, r * CELL + CELL // 2 - 6), title, fill='black')
    for c, pixels in enumerate(images):
      canvas.paste(Image.fromarray(_cell(pixels)), (LABEL_WIDTH + c * CELL, r * CELL))
  return canvas


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  # No default: the committed docs/figures/demo_images.png is only replaced when asked for.
  parser.add_argument('--out', required=True,
                      help='PNG path to write (docs/figures/demo_images.png is the README\'s)')
  parser.add_argument('--per_row', type=int, default=PER_ROW, help='images per row')
  args = parser.parse_args(argv)
  if args.per_row < 1:
    print(f'--per_row: expected a positive integer, got {args.per_row}', file=sys.stderr)
    return 2
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  partial = out.with_name(out.name + '.partial')
  render(args.per_row).save(partial, format='PNG')
  partial.replace(out)  # Nothing half-written under the real name.
  print(f'wrote {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
