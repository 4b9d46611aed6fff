"""Private randomness is secret: an adversary who reads everything a run publishes cannot
regenerate its noise or sampling, and two runs never share noise unless asked to."""

import json
import math

import jax
import numpy as np
import pytest
from flax import serialization

from dpjax import secret_keys
from experiments import checkpoint
from experiments import report
from experiments import run
from experiments import steps
from experiments import train
from experiments.configs import default as default_config

TINY = ['--epochs=1', '--image_size=32', '--batch_size=8', '--eval_batch_size=16',
        '--arch=tiny', '--progress=true', '--weights=none', '--mech=dpsgd', '--beta=1']


def _run(argv, capsys):
  code = run.main(argv)
  captured = capsys.readouterr()
  assert code == 0, captured.err
  return captured.out + captured.err


def _model(workdir):
  results = json.loads((workdir / 'results.json').read_text())
  raw = serialization.msgpack_restore((workdir / results['release']['model_file']).read_bytes())
  return results, np.concatenate([np.ravel(x) for x in jax.tree.leaves(raw['params'])])


def _recording_fresh_keys(monkeypatch):
  """Records every secret key a run draws (the checkpoints holding them go when it ends)."""
  drawn = []
  original = secret_keys.fresh_secret_key

  def recording():
    key = original()
    drawn.append(secret_keys.key_to_data(key))
    return key

  monkeypatch.setattr(secret_keys, 'fresh_secret_key', recording)
  return drawn


def test_identical_flags_add_different_noise_and_publish_no_key(tiny_data, tmp_path, capsys,
                                                                monkeypatch):
  drawn = _recording_fresh_keys(monkeypatch)
  data = f'--data_dir={tiny_data["pneumonia"]}'
  first, second = tmp_path / 'first', tmp_path / 'second'
  logs = [_run([data, f'--workdir={w}', *TINY], capsys) for w in (first, second)]
  (results, model_1), (_, model_2) = _model(first), _model(second)
  # Same --seed, same data, same init: only the secret noise and sampling differ.
  assert results['config']['seed'] == 0 and results['config']['noise_seed'] == -1
  assert np.max(np.abs(model_1 - model_2)) > 1e-4
  assert len(drawn) == 2 and drawn[0] != drawn[1]
  # Nothing published holds the key: not results.json, not release/, not the console; and
  # the checkpoints that held it are gone once the run has finished.
  for workdir, words, log in ((first, drawn[0], logs[0]), (second, drawn[1], logs[1])):
    published = log + ''.join(p.read_bytes().decode('latin-1') for p in workdir.rglob('*')
                              if p.is_file())
    assert 'private_key' not in published
    for word in words:
      assert str(word) not in published and f'{word:08x}' not in published
    assert not (workdir / 'checkpoints').exists()
    # The publishable report is results.json without its not_covered part, the data
    # fingerprint (a hash of every training file: with and without one patient it differs),
    # the wall time (it depends on the realised batch sizes) and the images per split.
    full = json.loads((workdir / 'results.json').read_text())
    release = json.loads((workdir / 'release' / 'release.json').read_text())
    private = ('not_covered', 'data_fingerprint', 'wall_time_s', 'split_sizes', 'split_patients')
    assert set(private) <= set(full)
    assert release == {k: v for k, v in full.items() if k not in private}
  assert results['private_randomness']['source'] == 'os_entropy'
  assert not results['guarantee'].startswith('NO guarantee')


def test_noise_seed_reproduces_the_run_and_voids_the_guarantee_in_writing(tiny_data, tmp_path, capsys):
  data = f'--data_dir={tiny_data["pneumonia"]}'
  first, second = tmp_path / 'first', tmp_path / 'second'
  logs = [_run([data, f'--workdir={w}', '--noise_seed=5', *TINY], capsys) for w in (first, second)]
  (results, model_1), (_, model_2) = _model(first), _model(second)
  np.testing.assert_array_equal(model_1, model_2)
  assert results['private_randomness']['source'] == 'noise_seed'
  assert results['guarantee'].startswith('NO guarantee against anyone who knows --noise_seed=5')
  assert 'WARNING: --noise_seed=5' in logs[0]
  # The seed and the settings the key is derived from are in the published config: every
  # reader can regenerate the noise, so the released epsilon is infinite and the table says so.
  release = json.loads((first / 'release' / 'release.json').read_text())
  assert release['config']['noise_seed'] == 5
  assert math.isinf(float(release['epsilon'])) and 0 < release['epsilon_if_seed_secret'] < math.inf
  assert report.guarantee_text(release).startswith('none: --noise_seed published')
  for field in ('epsilon_pld', 'epsilon_rdp', 'epsilon_replace_one'):  # No finite epsilon anywhere.
    assert math.isinf(float(release[field])) and 0 < release[f'{field}_if_seed_secret'] < math.inf
  assert all('epsilon' not in epoch and 'epsilon_if_seed_secret' in epoch
             for epoch in release['release']['history'])


def _config(**fields):
  config = default_config.demo(default_config.get_config())
  config.update(fields)
  return config


def test_noise_seed_keys_differ_between_runs_of_other_settings(tmp_path):
  # The grid runs LDP at beta = 1, 2, 4: with shared noise, 2 * y1 - y2 recovers the pixels.
  keys = [train.resolve_private_key(_config(mech='ldp', beta=beta, noise_seed=3), tmp_path)[0]
          for beta in (1.0, 2.0, 1.0)]
  data = [secret_keys.key_to_data(k) for k in keys]
  assert data[0] != data[1] and data[0] == data[2]
  # Fresh entropy: never the same twice, whatever the flags.
  fresh = [secret_keys.key_to_data(train.resolve_private_key(_config(), tmp_path)[0])
           for _ in range(2)]
  assert fresh[0] != fresh[1]


def test_ldp_release_depends_on_the_secret_key_only(tmp_path):
  # Two runs' LDP releases of the same images with independent secret keys: the classic
  # attack 2 * y1 - y2 (beta=1 and 2 with SHARED noise gives back the image) fails.
  config_1, config_2 = _config(mech='ldp', beta=1.0), _config(mech='ldp', beta=2.0)
  images = np.full((2, 16, 16, 3), 0.5, np.float32)
  ids = np.arange(2, dtype=np.int32)
  releases = []
  for config in (config_1, config_2):
    key, _ = train.resolve_private_key(config, tmp_path)
    ldp_fn = steps.make_ldp_fn(config)
    releases.append(np.asarray(ldp_fn(steps.private_stream(key, steps.LDP), images, ids)))
  recovered = 2 * releases[0] - releases[1]
  unclipped = (releases[0] > 0) & (releases[0] < 1) & (releases[1] > 0) & (releases[1] < 1)
  assert unclipped.sum() > 50
  assert np.mean(np.abs(recovered - images)[unclipped]) > 0.3
  # With shared noise the same attack is exact: what the secret keys prevent.
  key = secret_keys.reproducible_secret_key(0, 'shared')
  shared = [np.asarray(steps.make_ldp_fn(c)(steps.private_stream(key, steps.LDP), images, ids))
            for c in (config_1, config_2)]
  both = (shared[0] > 0) & (shared[0] < 1) & (shared[1] > 0) & (shared[1] < 1)
  # Within one 8-bit level: the release is discrete (8-bit levels plus discrete Laplace noise
  # drawn by inverse CDF from shared bits, so K(beta=2) is 2 K(beta=1) up to one level).
  assert both.sum() > 50
  np.testing.assert_allclose((2 * shared[0] - shared[1])[both],
                             np.round(images[both] * 255) / 255, atol=1.01 / 255)


@pytest.mark.parametrize('bad', ['--noise_seed=-2', '--privacy_unit=family',
                                 '--max_images_per_patient=0'])
def test_bad_private_flags_exit_2(tmp_path, capsys, bad):
  assert run.main([bad, f'--workdir={tmp_path / "run"}', *TINY]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and bad.split('=')[0] in err


def test_resume_takes_the_secret_from_the_checkpoint(tmp_path):
  # An exact resume needs the same noise stream; the key lives in the private checkpoint.
  saved = secret_keys.fresh_secret_key()
  ckpt = checkpoint.RunCheckpointer(tmp_path)
  ckpt.save(3, {'w': np.zeros(2)}, {'w': np.zeros(2)}, {},
            {'private_key': secret_keys.key_to_data(saved), 'source': 'os_entropy'})
  ckpt.close()
  key, secret = train.resolve_private_key(_config(), tmp_path)
  assert secret_keys.key_to_data(key) == secret_keys.key_to_data(saved)
  assert secret['source'] == 'os_entropy'


def test_ldp_noise_seed_run_shows_no_epsilon_in_the_table():
  # LDP's table text used to return before the --noise_seed check, printing a pure local
  # guarantee for noise anyone can regenerate from the published config.
  result = {'mech': 'ldp', 'epsilon': 'inf', 'epsilon_if_seed_secret': 21.39, 'delta': 0.0,
            'ldp': {'per_pixel_epsilon': 'inf', 'per_image_epsilon': 'inf', 'grayscale': True}}
  assert report.guarantee_text(result).startswith('none: --noise_seed published')


def test_a_run_of_another_format_is_neither_reused_nor_resumed(tmp_path):
  # Runs made before per-unit split hashing (or with another release format) trained on another
  # split and released other fields: refused in one line, never silently reused.
  config = _config(mech='dpsgd')
  fingerprint = train._fingerprint(config)
  with pytest.raises(train.ConfigError, match='another dpjax version'):
    train._check_same_run(tmp_path, 'finished results', fingerprint, config, 'abc', 'abc', None)
  train._check_same_run(tmp_path, 'finished results', fingerprint, config, 'abc', 'abc',
                        train.RUN_FORMAT)  # The same format, settings and data: accepted.


def test_a_public_noise_seed_voids_the_paper_protocols_conditional_epsilons_too():
  # BatchNorm in training mode already makes `epsilon` infinite; the two conditional epsilons
  # of the paper protocol stayed finite in a --noise_seed release before this was fixed.
  from experiments import results as results_lib
  from experiments.configs import default
  config = default.get_config()
  config.noise_seed = 7
  summary = {'epsilon': float('inf'), 'epsilon_pld': 0.9, 'epsilon_rdp': 1.1,
             'epsilon_if_batchnorm_were_frozen': 0.9, 'epsilon_claimed_by_paper_method': 0.8}
  voided = results_lib._void_if_seed_public(config, summary)
  for field in ('epsilon_pld', 'epsilon_rdp', 'epsilon_if_batchnorm_were_frozen',
                'epsilon_claimed_by_paper_method'):
    assert math.isinf(voided[field]) and voided[f'{field}_if_seed_secret'] == summary[field]
  assert math.isinf(voided['epsilon']) and 'epsilon_if_seed_secret' not in voided
  config.noise_seed = -1  # Secret noise: nothing changes.
  assert results_lib._void_if_seed_public(config, summary) == summary
