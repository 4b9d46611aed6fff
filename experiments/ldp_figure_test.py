"""Tests of experiments.ldp_figure: the grid is drawn from the bundled real samples, and the
committed figure (docs/figures/ldp_grid.png) shows the LDP mechanism the code has now."""

import hashlib
import json

import jax
import numpy as np
import pytest
from PIL import Image

from dpjax import ldp
from experiments import ldp_figure

REGENERATE = 'python -m experiments.ldp_figure --out=docs/figures/ldp_grid.png'


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
  ldp_figure.main([f'--out={out}', '--image_size=16'])  # The sidecar's probe size: one compile.
  with Image.open(out) as png:
    assert png.format == 'PNG'
    assert png.size == ldp_figure.figure_pixel_size()
    pixels = np.asarray(png.convert('L'), np.float64)
  assert pixels.std() > 10  # Not a blank canvas.
  printed = capsys.readouterr().out
  assert 'eps=768 per 16x16x3 image' in printed  # Colour: 16 * 16 * 3 / beta at beta = 1.
  assert 'eps=256 per 16x16 grey image' in printed  # Grey: one value per grey pixel.
  assert '16x16x3 grey' not in printed
  assert 'no image-level guarantee' in printed
  record = json.loads(ldp_figure.sidecar_path(out).read_text())
  assert record['png_sha256'] == hashlib.sha256(out.read_bytes()).hexdigest()
  assert record['image_size'] == 16
  assert record['epsilon_texts'] == ldp_figure.epsilon_texts(16)
  assert not list(out.parent.glob('*.partial'))


def test_out_is_required(capsys):
  with pytest.raises(SystemExit):
    ldp_figure.main([])
  assert '--out' in capsys.readouterr().err


def test_epsilon_texts_count_one_value_per_grey_pixel():
  texts = ldp_figure.epsilon_texts(224)
  assert 'Grey X-ray: one noise value per grey pixel' in texts['suptitle']
  assert 'd = 224x224 = 50,176' in texts['suptitle']
  assert 'd = 224x224x3 = 150,528' in texts['suptitle']
  assert texts['releases']['0/1'] == 'β=1: ε=1/grey pixel,\nε=50,176 per 224x224 grey image'
  assert texts['releases']['1/4'] == 'β=4: ε=0.25/pixel value,\nε=37,632 per 224x224x3 image'


def test_noise_structure_tells_the_releases_apart():
  """The probe behind the sidecar's variant sees one value per grey pixel, per pixel value, or
  per image: a grey release noised per channel would not pass for the grey mechanism."""
  grey = ldp_figure.load_sample(ldp_figure.SAMPLES_DIR / ldp_figure.SAMPLES[0][1], 16)
  grey = np.round(255 * (0.25 + 0.5 * grey))[None] / 255
  key, ids = jax.random.key(1), np.zeros(1, np.int32)
  structure = lambda release: ldp_figure._noise_structure(np.asarray(release)[0], grey[0])
  assert structure(ldp.laplace_perturb(key, grey, 0.02, ids, grayscale=True)).startswith('H*W ')
  assert structure(ldp.laplace_perturb(key, grey, 0.02, ids)).startswith('H*W*C ')
  assert structure(ldp.brightness_shift(key, grey, 0.02, ids)).startswith('1 ')


def test_committed_figure_shows_the_current_mechanism():
  """docs/figures/ldp_grid.json records what the committed figure was drawn with. A change to
  the LDP mechanism (noise distribution, one value per grey pixel, epsilon accounting) or to
  the epsilons the figure states fails here until the figure is regenerated."""
  png = ldp_figure.COMMITTED_FIGURE
  record = json.loads(ldp_figure.sidecar_path(png).read_text())
  assert record['version'] == ldp_figure.SIDECAR_VERSION, REGENERATE
  assert record['png_sha256'] == hashlib.sha256(png.read_bytes()).hexdigest(), (
      f'{png} was not written with its sidecar: {REGENERATE}')
  assert record['betas'] == list(ldp_figure.BETAS), REGENERATE
  assert record['variant'] == ldp_figure.mechanism_variant(), (
      f'The LDP mechanism changed since the figure was drawn: {REGENERATE}')
  assert record['epsilon_texts'] == ldp_figure.epsilon_texts(record['image_size']), (
      f'The figure states other epsilons than the code: {REGENERATE}')
  assert record['image_size'] == 224  # The trainer's size, as the README's figure says.
  with Image.open(png) as image:
    assert image.size == ldp_figure.figure_pixel_size(), REGENERATE
