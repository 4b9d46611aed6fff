"""The README's demo-image grid renders from the real demo renderer."""

import numpy as np
from PIL import Image

from experiments import demo_figure


def test_figure_has_every_class_and_writes_atomically(tmp_path):
  titles = [title for title, _ in demo_figure.rows(per_row=1)]
  assert titles == ['chest: normal', 'chest: pneumonia'] + [f'fundus: DR grade {g}' for g in range(5)]
  out = tmp_path / 'figs' / 'demo.png'
  assert demo_figure.main([f'--out={out}', '--per_row=1']) == 0
  image = np.asarray(Image.open(out))
  assert image.shape == (7 * demo_figure.CELL, demo_figure.LABEL_WIDTH + demo_figure.CELL, 3)
  assert [p.name for p in out.parent.iterdir()] == ['demo.png']


def test_bad_flag_exits_2(tmp_path, capsys):
  assert demo_figure.main([f'--out={tmp_path / "x.png"}', '--per_row=0']) == 2
  assert '--per_row' in capsys.readouterr().err and not (tmp_path / 'x.png').exists()


def test_no_default_output_so_the_committed_figure_is_never_overwritten(capsys):
  import pytest
  with pytest.raises(SystemExit) as exit_info:
    demo_figure.main([])
  assert exit_info.value.code == 2 and '--out' in capsys.readouterr().err
