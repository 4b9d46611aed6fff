"""Tests of experiments.ldp_figure: the grid is drawn from the bundled real samples."""

import numpy as np
from PIL import Image

from experiments import ldp_figure


def test_samples_are_bundled_with_attribution():
  for _, name, _ in ldp_figure.SAMPLES:
    assert (ldp_figure.SAMPLES_DIR / name).is_file(), name
  attribution = (ldp_figure.SAMPLES_DIR / 'ATTRIBUTION.md').read_text()
  assert 'CC BY 4.0' in attribution and 'CC0' in attribution


def test_load_sample_is_a_unit_range_rgb_square():
  xray = ldp_figure.load_sample(ldp_figure.SAMPLES_DIR / ldp_figure.SAMPLES[0][1], 40)
  fundus = ldp_figure.load_sample(ldp_figure.SAMPLES_DIR / ldp_figure.SAMPLES[1][1], 40)
  for image in (xray, fundus):
    assert image.shape == (40, 40, 3) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05  # A real picture.
  np.testing.assert_array_equal(xray[..., 0], xray[..., 2])  # Gray X-ray, 3 equal channels.
  assert np.abs(fundus[..., 0] - fundus[..., 2]).mean() > 0.05  # Colour fundus.


def test_cli_writes_the_png_grid(tmp_path, capsys):
  out = tmp_path / 'figures' / 'grid.png'
  ldp_figure.main([f'--out={out}', '--image_size=32'])
  with Image.open(out) as png:
    assert png.format == 'PNG'
    assert png.size == ldp_figure.figure_pixel_size()
    pixels = np.asarray(png.convert('L'), np.float64)
  assert pixels.std() > 10  # Not a blank canvas.
  printed = capsys.readouterr().out
  assert 'eps=3072 per 32x32x3 image' in printed  # 32 * 32 * 3 / beta at beta = 1.
  assert 'no image-level guarantee' in printed
