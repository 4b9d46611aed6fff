"""Input-pipeline benchmark: random-access gather of 128 prepared 256x256x3 images.

    python -m benchmarks.input_pipeline [--num_images 1500] [--repeats 30]

Builds a temporary APTOS-layout folder of random-noise images, prepares it with the real
TFDS builder (ArrayRecord, raw uint8 bytes), then times ``Split.gather`` on 128 random
indices, single process, warm page cache. Target: >= 2,000 images/s on 2 CPU cores.
Writes benchmarks/results/input_pipeline.json. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from dpjax.data import datasets, tfds_builders

RESULTS = Path(__file__).parent / 'results' / 'input_pipeline.json'


def _write_folder(root: Path, num_images: int, side: int, seed: int) -> None:
  rng = np.random.default_rng(seed)  # Public synthetic pixels.
  (root / 'train_images').mkdir(parents=True)
  lines = ['id_code,diagnosis']
  for i in range(num_images):
    code = f'{i:012x}'
    lines.append(f'{code},{i % 5}')
    pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / 'train_images' / f'{code}.jpeg', quality=90)
  (root / 'train.csv').write_text('\n'.join(lines) + '\n')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num_images', type=int, default=1500)
  parser.add_argument('--prep_size', type=int, default=256)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=30)
  args = parser.parse_args()

  tmp = Path(tempfile.mkdtemp(prefix='dpjax-bench-'))
  try:
    start = time.perf_counter()
    _write_folder(tmp / 'data', args.num_images, args.prep_size, seed=0)
    write_s = time.perf_counter() - start

    tfds.display_progress_bar(False)
    start = time.perf_counter()
    builder = tfds_builders.Aptos2019(config=tfds_builders.prep_config(args.prep_size), data_dir=str(tmp / 'tfds'))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp / 'data')),
                                 file_format='array_record')
    prepare_s = time.perf_counter() - start
    info = builder.info.metadata['splits']['train']
    split = datasets.Split('train', builder.as_data_source()['train'], np.arange(len(info['labels'])),
                           info['labels'], info['ids'])

    rng = np.random.default_rng(1)
    for _ in range(3):  # Warm the page cache and the readers.
      split.gather(rng.integers(0, len(split), args.batch))
    times = []
    for _ in range(args.repeats):
      indices = rng.integers(0, len(split), args.batch)
      start = time.perf_counter()
      images, labels, ids = split.gather(indices)
      times.append(time.perf_counter() - start)
    assert images.shape == (args.batch, args.prep_size, args.prep_size, 3) and images.dtype == np.uint8
    median = float(np.median(times))
    result = {
        'num_records': len(split), 'prep_size': args.prep_size, 'batch': args.batch, 'repeats': args.repeats,
        'images_per_s_median': args.batch / median, 'images_per_s_mean': args.batch * len(times) / sum(times),
        'images_per_s_best': args.batch / min(times),  # Least disturbed by other load on the machine.
        'batch_ms_median': 1e3 * median, 'write_folder_s': write_s, 'prepare_s': prepare_s,
        'prepared_mb': sum(f.stat().st_size for f in (tmp / 'tfds').rglob('*') if f.is_file()) / 2**20,
        'cpu_count': os.cpu_count(), 'load_average_1min': os.getloadavg()[0], 'machine': platform.machine(), 'python': platform.python_version(),
        'tfds': tfds.__version__,
    }
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  print(f"gather {args.batch} random of {result['num_records']} records at {args.prep_size}px: "
        f"{result['images_per_s_median']:.0f} images/s (median of {args.repeats}, best "
        f"{result['images_per_s_best']:.0f}; target >= 2000); "
        f"prepared in {prepare_s:.1f} s, {result['prepared_mb']:.0f} MB")
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text(json.dumps(result, indent=1) + '\n')
  print(f'wrote {RESULTS}')


if __name__ == '__main__':
  main()
