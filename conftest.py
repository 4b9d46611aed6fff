"""Test-session settings for the whole tree (tests/, dpjax/, experiments/, benchmarks/)."""

import atexit
import os
import shutil
import tempfile

# No test may reach the internet: the ImageNet weights "download" fails at once unless a test
# serves them itself (tests/test_weights_download.py starts its own localhost server).
os.environ.setdefault('DPJAX_WEIGHTS_URL', 'file:///nonexistent/dpjax-tests/resnet18-f37072fd.pth')

# One XLA compilation cache for the session and every process it starts: many tests compile
# the same tiny training step (test data only: nothing private is in these executables).
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='dpjax_test_xla_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
