"""ImageNet weights arrive by themselves: `dpjax.weights.ensure_imagenet_checkpoint`.

Nothing here touches the internet: downloads come from an HTTP server on 127.0.0.1 started by
the test (and always shut down) or from file:// URLs. The served file is a ResNet-18 state dict
in torch's zip format written without torch (`weights/synthetic.py`); its sha256 prefix is
passed as `sha256_prefix=`, since only torchvision's real file starts with f37072fd (one test
checks that the default prefix rejects it).
"""

import contextlib
import fcntl
import hashlib
import json
import http.server
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest
import tqdm

from dpjax import models
from dpjax import weights
from weights import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
FILENAME = weights.TORCHVISION_RESNET18_FILENAME


@pytest.fixture(scope='module')
def resnet18_pth(tmp_path_factory):
  """(path, bytes, sha256 prefix) of a seeded ResNet-18 .pth in torchvision's layout."""
  path = tmp_path_factory.mktemp('served') / 'seeded_resnet18.pth'
  synthetic.write_torch_pth(path, synthetic.seeded_state_dict(0))
  blob = path.read_bytes()
  return path, blob, hashlib.sha256(blob).hexdigest()[:8]


@pytest.fixture(autouse=True)
def _no_weights_anywhere(tmp_path, monkeypatch):
  """No converted checkpoint, torch hub copy, URL override or proxy from the environment."""
  monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(tmp_path / 'no_weights_dir'))
  monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'no_torch_home'))
  monkeypatch.delenv(weights.WEIGHTS_URL_ENV, raising=False)
  for name in ('http_proxy', 'HTTP_PROXY', 'https_proxy', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('no_proxy', '*')


class _Server:
  """What the test server did: GET requests counted, stalled handlers released at the end."""

  def __init__(self):
    self.requests = 0
    self.ranges = []  # The Range header of each request (None when absent).
    self.lock = threading.Lock()
    self.release = threading.Event()
    self.url = ''


@contextlib.contextmanager
def serve(body: bytes, mode: str = 'ok', delay_s: float = 0.0):
  """An HTTP server on 127.0.0.1 serving `body` at any path, in one of these modes:

  ok: 200 with Content-Length; no_length: without it; stall: never answers; stall_body: sends
  half the body, then nothing; truncated: half the body, then closes; 404: not found;
  trickle: 1 KiB every 20 ms (never silent for long, never done in time); die_once: the first
  request gets a third of the body, then the connection closes; later ones are answered with
  206 and the requested range when they send `Range: bytes=N-`; die_once_no_range: as
  die_once, but later requests get the whole body (200), ignoring Range; range: as the
  requests after the first in die_once.
  """
  state = _Server()

  class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
      pass

    def do_GET(self):
      with state.lock:
        state.requests += 1
        first = state.requests == 1
        state.ranges.append(self.headers.get('Range'))
      if mode == 'range' or (mode in ('die_once', 'die_once_no_range') and not first):
        start = 0
        requested = self.headers.get('Range', '')
        if mode != 'die_once_no_range' and requested.startswith('bytes=') and requested.endswith('-'):
          start = int(requested[len('bytes='):-1])
        self.send_response(206 if start else 200)
        self.send_header('Content-Length', str(len(body) - start))
        if start:
          self.send_header('Content-Range', f'bytes {start}-{len(body) - 1}/{len(body)}')
        self.end_headers()
        self.wfile.write(body[start:])
        return
      if mode == 'stall':
        state.release.wait(60)
        return
      if mode == '404':
        self.send_error(404)
        return
      state.release.wait(delay_s)
      self.send_response(200)
      if mode != 'no_length':
        self.send_header('Content-Length', str(len(body)))
      self.end_headers()
      try:
        if mode == 'trickle':
          for i in range(0, len(body), 1024):
            if state.release.wait(0.02):
              return
            self.wfile.write(body[i:i + 1024])
            self.wfile.flush()
          return
        if mode in ('die_once', 'die_once_no_range'):
          self.wfile.write(body[:len(body) // 3])
          self.wfile.flush()
          return
        if mode in ('stall_body', 'truncated'):
          self.wfile.write(body[:len(body) // 2])
          self.wfile.flush()
          if mode == 'stall_body':
            state.release.wait(60)
          return
        self.wfile.write(body)
      except (BrokenPipeError, ConnectionResetError):
        pass  # The client gave up.

  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
  server.daemon_threads = True
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  state.url = f'http://127.0.0.1:{server.server_address[1]}/models/{FILENAME}'
  try:
    yield state
  finally:
    state.release.set()
    server.shutdown()
    server.server_close()
    thread.join(10)


def _closed_port_url() -> str:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  return f'http://127.0.0.1:{port}/models/{FILENAME}'


def _assert_converted(path, blob_path):
  expected = weights.load_torchvision(blob_path)
  loaded = weights.load_checkpoint(path)
  assert jax.tree.structure(loaded) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)


def _weights_folder(cache):
  return cache / weights.CACHE_SUBDIR


def _leftovers(cache) -> list[str]:
  """Files in the cache's weights folder besides the lock file."""
  folder = _weights_folder(cache)
  return sorted(p.name for p in folder.iterdir() if not p.name.endswith('.lock')) if folder.is_dir() else []


# --- (a) download, check, convert, use; a second call downloads nothing ----------------------


def test_download_is_checked_converted_found_by_load_pretrained_and_done_once(tmp_path, resnet18_pth):
  pth, blob, prefix = resnet18_pth
  cache = tmp_path / 'cache'
  with serve(blob) as server:
    path = weights.ensure_imagenet_checkpoint(cache_dir=cache, url=server.url,
                                              sha256_prefix=prefix, progress=False, timeout_s=30)
    assert server.requests == 1
    assert path == _weights_folder(cache) / 'resnet18_imagenet'
    assert _leftovers(cache) == [FILENAME, 'resnet18_imagenet']  # No .part, no staging folder.
    assert (_weights_folder(cache) / FILENAME).read_bytes() == blob
    _assert_converted(path, pth)
    assert weights.find_imagenet_checkpoint() is None  # Without cache_dir: as before.
    assert weights.find_imagenet_checkpoint(cache) == path

    model = models.ResNet18(num_classes=3)
    variables, pretrained, description = weights.load_pretrained(
        'imagenet', model, 3, jax.random.key(0), (1, 32, 32, 3), cache_dir=cache)
    assert pretrained and str(path) in description and 'new 3-class head' in description
    state = synthetic.seeded_state_dict(0)
    np.testing.assert_array_equal(variables['params']['layer3_0']['conv1']['kernel'],
                                  state['layer3.0.conv1.weight'].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables['batch_stats']['bn1']['var'], state['bn1.running_var'])

    again = weights.ensure_imagenet_checkpoint(cache_dir=cache, url=server.url,
                                               sha256_prefix=prefix, progress=False, timeout_s=30)
    assert again == path and server.requests == 1


def test_the_real_sha256_prefix_is_checked_by_default(tmp_path, resnet18_pth):
  _, blob, prefix = resnet18_pth
  assert prefix != weights.TORCHVISION_RESNET18_SHA256_PREFIX
  cache = tmp_path / 'cache'
  with serve(blob) as server:
    with pytest.raises(weights.WeightFileError, match='does not start with f37072fd') as error:
      weights.ensure_imagenet_checkpoint(cache_dir=cache, url=server.url, progress=False)
  assert not isinstance(error.value, weights.WeightsUnavailable)
  assert FILENAME in str(error.value)
  assert _leftovers(cache) == []


def test_an_existing_checkpoint_is_returned_without_any_download(tmp_path, monkeypatch):
  existing = weights.save_checkpoint({'params': {'x': np.ones(2, np.float32)}},
                                     tmp_path / 'mine' / 'resnet18_imagenet')
  monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(tmp_path / 'mine'))
  assert weights.ensure_imagenet_checkpoint(cache_dir=tmp_path / 'cache', url=_closed_port_url(),
                                            progress=False, timeout_s=5) == existing
  assert not (tmp_path / 'cache').exists()


# --- (b) file:// URLs, the URL from the environment, copies made by hand ----------------------


def test_file_url_from_the_environment(tmp_path, resnet18_pth, monkeypatch):
  pth, _, prefix = resnet18_pth
  monkeypatch.setenv(weights.WEIGHTS_URL_ENV, pth.as_uri())
  cache = tmp_path / 'cache'
  path = weights.ensure_imagenet_checkpoint(cache_dir=cache, sha256_prefix=prefix, progress=False)
  assert path == _weights_folder(cache) / 'resnet18_imagenet'
  _assert_converted(path, pth)
  assert _leftovers(cache) == [FILENAME, 'resnet18_imagenet']


def test_torch_hub_copy_is_converted_without_downloading(tmp_path, resnet18_pth, monkeypatch):
  pth, blob, prefix = resnet18_pth
  hub = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
  hub.mkdir(parents=True)
  (hub / FILENAME).write_bytes(blob)
  monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
  cache = tmp_path / 'cache'
  path = weights.ensure_imagenet_checkpoint(cache_dir=cache, url=_closed_port_url(),
                                            sha256_prefix=prefix, progress=False, timeout_s=5)
  _assert_converted(path, pth)
  assert (hub / FILENAME).read_bytes() == blob


def test_a_bad_copy_put_in_the_cache_by_hand_is_named_and_kept(tmp_path):
  cache = tmp_path / 'cache'
  placed = _weights_folder(cache) / FILENAME
  placed.parent.mkdir(parents=True)
  placed.write_bytes(b'not the weights')
  with serve(b'') as server:
    with pytest.raises(weights.WeightFileError, match='delete it or replace it') as error:
      weights.ensure_imagenet_checkpoint(cache_dir=cache, url=server.url, progress=False)
    assert server.requests == 0
  assert str(placed) in str(error.value) and 'f37072fd' in str(error.value)
  assert _leftovers(cache) == [FILENAME]


def test_an_unusable_cache_is_a_weight_file_error_naming_it(tmp_path, resnet18_pth):
  not_a_folder = tmp_path / 'cache'
  not_a_folder.write_text('a file')
  with pytest.raises(weights.WeightFileError, match='cannot prepare the ImageNet weights') as error:
    weights.ensure_imagenet_checkpoint(cache_dir=not_a_folder, url=resnet18_pth[0].as_uri(),
                                       sha256_prefix=resnet18_pth[2], progress=False)
  assert str(not_a_folder) in str(error.value)
  assert not isinstance(error.value, weights.WeightsUnavailable)


# --- (c) wrong bytes: an error naming the file, nothing left behind ----------------------------


@pytest.mark.parametrize('how', ['http', 'file'])
def test_download_with_the_wrong_sha256_leaves_nothing(tmp_path, resnet18_pth, how):
  _, _, prefix = resnet18_pth
  wrong = b'<html>captive portal</html>' * 1000
  cache = tmp_path / 'cache'
  with serve(wrong) as server:
    if how == 'file':
      (tmp_path / FILENAME).write_bytes(wrong)
      url = (tmp_path / FILENAME).as_uri()
    else:
      url = server.url
    with pytest.raises(weights.WeightFileError) as error:
      weights.ensure_imagenet_checkpoint(cache_dir=cache, url=url, sha256_prefix=prefix,
                                         progress=False, timeout_s=10)
  message = str(error.value)
  assert not isinstance(error.value, weights.WeightsUnavailable)
  assert FILENAME in message and url in message and prefix in message
  assert hashlib.sha256(wrong).hexdigest() in message and 'deleted' in message
  assert _leftovers(cache) == []
  assert weights.find_imagenet_checkpoint(cache) is None


# --- (d) no connection, stalls, HTTP errors: WeightsUnavailable in time -----------------------


def _assert_says_what_to_copy_where(error, url, cache):
  message = str(error)
  destination = _weights_folder(cache) / FILENAME
  assert '\n' not in message
  assert url in message
  assert f'copy {FILENAME}' in message and str(destination) in message
  assert 'python -m weights.convert' in message
  assert error.url == url and error.destination == destination and error.reason in message


def test_no_server_is_unavailable_at_once(tmp_path):
  cache = tmp_path / 'cache'
  url = _closed_port_url()
  start = time.monotonic()
  with pytest.raises(weights.WeightsUnavailable) as error:
    weights.ensure_imagenet_checkpoint(cache_dir=cache, url=url, progress=False, timeout_s=5)
  assert time.monotonic() - start < 5
  assert 'refused' in error.value.reason.lower()
  _assert_says_what_to_copy_where(error.value, url, cache)
  assert _leftovers(cache) == []


@pytest.mark.parametrize('mode, reason', [('stall', 'no response for 1 s'),
                                          ('stall_body', 'no response for 1 s'),
                                          ('truncated', 'before the end'),
                                          ('404', 'HTTP 404')])
def test_stalls_truncations_and_http_errors_are_unavailable_within_the_timeout(
    tmp_path, mode, reason):
  cache = tmp_path / 'cache'
  with serve(os.urandom(300_000), mode=mode) as server:
    start = time.monotonic()
    with pytest.raises(weights.WeightsUnavailable) as error:
      weights.ensure_imagenet_checkpoint(cache_dir=cache, url=server.url, progress=False,
                                         timeout_s=1)
    elapsed = time.monotonic() - start
  assert elapsed < 4, elapsed  # 1 s of silence, plus scheduling slack.
  assert reason in error.value.reason
  _assert_says_what_to_copy_where(error.value, server.url, cache)
  # What arrived is kept for the next attempt to continue from; nothing else is left.
  kept = [f'{FILENAME}.part'] if mode in ('stall_body', 'truncated') else []
  assert _leftovers(cache) == kept
  if kept:
    assert 'bytes kept in' in error.value.reason and 'continues' in error.value.reason


# --- (d2) a trickle meets the deadline; a cut download is resumed ------------------------------


def test_a_trickling_download_ends_at_the_deadline_with_one_line(tmp_path, monkeypatch):
  cache = tmp_path / 'cache'
  monkeypatch.setenv(weights.DOWNLOAD_DEADLINE_ENV, '1.5')  # What the application can set.
  with serve(os.urandom(600_000), mode='trickle') as server:
    start = time.monotonic()
    with pytest.raises(weights.WeightsUnavailable) as error:
      weights.ensure_imagenet_checkpoint(cache_dir=cache, url=server.url, progress=False,
                                         timeout_s=5)
    elapsed = time.monotonic() - start
  assert 1.5 <= elapsed < 4, elapsed  # Never silent for 5 s, yet stopped by the deadline.
  assert 'not finished within the deadline of 1.5 s' in error.value.reason
  assert weights.DOWNLOAD_DEADLINE_ENV in error.value.reason
  _assert_says_what_to_copy_where(error.value, server.url, cache)
  assert _leftovers(cache) == [f'{FILENAME}.part']


def test_the_deadline_argument_and_its_default(tmp_path, monkeypatch):
  with serve(os.urandom(600_000), mode='trickle') as server:
    start = time.monotonic()
    with pytest.raises(weights.WeightsUnavailable, match='deadline of 1 s'):
      weights.download_file(server.url, tmp_path / 'f.bin', sha256_prefix='', timeout_s=5,
                            deadline_s=1, progress=False)
    assert time.monotonic() - start < 3.5
  # Default: a base plus the size at a slow rate; torchvision's file gets a few minutes.
  assert weights.download_deadline_s(0) == weights.DOWNLOAD_DEADLINE_BASE_S
  assert 240 < weights.download_deadline_s() < 600
  assert weights.download_deadline_s(10 * weights.TORCHVISION_RESNET18_BYTES) > 2000
  monkeypatch.setenv(weights.DOWNLOAD_DEADLINE_ENV, 'soon')
  with pytest.raises(weights.UserInputError, match='DPJAX_DOWNLOAD_DEADLINE_S'):
    weights.download_deadline_s()


@pytest.mark.parametrize('mode', ['die_once', 'die_once_no_range'])
def test_a_download_cut_midway_is_resumed_by_the_next_attempt(tmp_path, resnet18_pth, mode):
  pth, blob, prefix = resnet18_pth
  cache = tmp_path / 'cache'
  part = _weights_folder(cache) / f'{FILENAME}.part'
  with serve(blob, mode=mode) as server:
    with pytest.raises(weights.WeightsUnavailable, match='before the end') as error:
      weights.ensure_imagenet_checkpoint(cache_dir=cache, url=server.url, sha256_prefix=prefix,
                                         progress=False, timeout_s=10)
    kept = len(blob) // 3
    assert part.read_bytes() == blob[:kept]
    assert f'{kept} bytes kept in {part}' in error.value.reason
    path = weights.ensure_imagenet_checkpoint(cache_dir=cache, url=server.url,
                                              sha256_prefix=prefix, progress=False, timeout_s=10)
    assert server.ranges == [None, f'bytes={kept}-']
  # 206 (resumed) or 200 (Range ignored: started again cleanly): the same, checked file.
  assert (_weights_folder(cache) / FILENAME).read_bytes() == blob
  assert _leftovers(cache) == [FILENAME, 'resnet18_imagenet']
  _assert_converted(path, pth)


def test_a_kept_part_of_another_file_is_replaced_by_a_fresh_download(tmp_path):
  body = os.urandom(200_000)
  prefix = hashlib.sha256(body).hexdigest()[:8]
  destination = tmp_path / 'file.bin'
  (tmp_path / 'file.bin.part').write_bytes(b'x' * 1000)  # Not a prefix of `body`.
  with serve(body, mode='range') as server:
    assert weights.download_file(server.url, destination, sha256_prefix=prefix, timeout_s=10,
                                 progress=False).startswith(prefix)
    assert server.ranges == ['bytes=1000-', None]
  assert destination.read_bytes() == body
  assert sorted(p.name for p in tmp_path.iterdir()) == ['file.bin']


def test_a_missing_file_url_is_unavailable(tmp_path):
  url = (tmp_path / 'mirror' / FILENAME).as_uri()
  with pytest.raises(weights.WeightsUnavailable) as error:
    weights.ensure_imagenet_checkpoint(cache_dir=tmp_path / 'cache', url=url, progress=False)
  _assert_says_what_to_copy_where(error.value, url, tmp_path / 'cache')


# --- (e) two processes at once: one download, one checkpoint ----------------------------------


_CHILD = textwrap.dedent('''
    import sys
    from dpjax import weights
    cache, url, prefix = sys.argv[1:]
    print(weights.ensure_imagenet_checkpoint(cache_dir=cache, url=url, sha256_prefix=prefix,
                                             progress=True, timeout_s=60))
''')


def test_two_processes_at_once_download_once_and_share_the_checkpoint(tmp_path, resnet18_pth):
  pth, blob, prefix = resnet18_pth
  cache = tmp_path / 'cache'
  folder = _weights_folder(cache)
  folder.mkdir(parents=True)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONUNBUFFERED': '1'}
  logs = [tmp_path / f'stderr{i}.txt' for i in range(2)]
  # The test holds the lock until both processes wait for it, so that they then race.
  with serve(blob, delay_s=0.5) as server, open(folder / 'resnet18_imagenet.lock', 'a') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    procs = []
    try:
      for log in logs:
        with open(log, 'w') as stderr:
          procs.append(subprocess.Popen(
              [sys.executable, '-c', _CHILD, str(cache), server.url, prefix], cwd=REPO, env=env,
              stdout=subprocess.PIPE, stderr=stderr, text=True))
      deadline = time.monotonic() + 180
      while not all('Waiting for another process' in log.read_text() for log in logs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [log.read_text()[-2000:] for log in logs]
        time.sleep(0.05)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
      outputs = []
      for proc in procs:
        try:
          outputs.append(proc.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
          proc.kill()
          raise
    assert [p.returncode for p in procs] == [0, 0], [log.read_text()[-2000:] for log in logs]
    assert server.requests == 1
  paths = [out.strip().splitlines()[-1] for out in outputs]
  assert paths[0] == paths[1] == str(folder / 'resnet18_imagenet')
  assert _leftovers(cache) == [FILENAME, 'resnet18_imagenet']
  _assert_converted(folder / 'resnet18_imagenet', pth)
  # The one that downloaded drew the bar; both waited for the lock first.
  assert sum('100%' in log.read_text() for log in logs) == 1


# --- (f) the progress bar ---------------------------------------------------------------------


def test_progress_bar_reaches_the_total_on_stderr_and_can_be_silenced(tmp_path, capsys):
  body = os.urandom(300_000)
  prefix = hashlib.sha256(body).hexdigest()[:8]
  with serve(body) as server:
    weights.download_file(server.url, tmp_path / 'shown.bin', sha256_prefix=prefix, timeout_s=10)
    shown = capsys.readouterr()
    weights.download_file(server.url, tmp_path / 'quiet.bin', sha256_prefix=prefix, timeout_s=10,
                          progress=False)
    quiet = capsys.readouterr()
  assert '100%' in shown.err and '293k/293k' in shown.err  # 300,000 B in KiB.
  assert shown.out == '' and quiet.out == '' and quiet.err == ''
  assert (tmp_path / 'shown.bin').read_bytes() == body == (tmp_path / 'quiet.bin').read_bytes()


class _RecordingBar:
  made = []

  def __init__(self, *, total=None, disable=False, **kwargs):
    self.total, self.disable, self.n, self.kwargs = total, disable, 0, kwargs
    _RecordingBar.made.append(self)

  def update(self, n):
    self.n += n

  def __enter__(self):
    return self

  def __exit__(self, *args):
    pass


@pytest.mark.parametrize('mode', ['ok', 'no_length'])
def test_progress_bar_counts_bytes_against_content_length(tmp_path, monkeypatch, mode):
  body = os.urandom(3 << 20)
  prefix = hashlib.sha256(body).hexdigest()[:8]
  monkeypatch.setattr(tqdm, 'tqdm', _RecordingBar)
  _RecordingBar.made.clear()
  with serve(body, mode=mode) as server:
    weights.download_file(server.url, tmp_path / 'file.bin', sha256_prefix=prefix, timeout_s=10)
  (bar,) = _RecordingBar.made
  assert bar.n == len(body) and not bar.disable and bar.kwargs['unit'] == 'B'
  assert bar.total == (len(body) if mode == 'ok' else None)


def test_offline_demo_trains_from_scratch_and_real_data_stops(tiny_data, tmp_path, capsys,
                                                              monkeypatch):
  # The application's side: without the weights, the demo says so and trains from scratch;
  # a run on real data stops with one line naming the file and --weights=none.
  from experiments import run
  monkeypatch.setenv('DPJAX_WEIGHTS_URL', f'file://{tmp_path}/missing/resnet18-f37072fd.pth')
  tiny = ['--epochs=1', '--image_size=32', '--batch_size=8', '--eval_batch_size=16',
          '--arch=resnet18', '--progress=false', '--mech=none', '--weights=imagenet']
  assert run.main([f'--data_dir={tiny_data["pneumonia"]}', f'--workdir={tmp_path / "real"}',
                   *tiny]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'resnet18-f37072fd.pth' in err
  assert '--weights=none' in err and '--weights=imagenet' in err
  assert not (tmp_path / 'real').exists()
  assert run.main([f'--workdir={tmp_path / "demo"}', *tiny, '--batch_size=64']) == 0
  captured = capsys.readouterr()
  assert 'no ImageNet weights' in captured.err and 'trains from scratch' in captured.err
  results = json.loads((tmp_path / 'demo' / 'results.json').read_text())
  assert results['pretrained'] is False
