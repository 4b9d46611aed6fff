"""Downloads torchvision's ResNet-18 ImageNet weights and converts them (needs internet).

  python -m weights.fetch [--dest=weights/resnet18-f37072fd.pth] [--out=weights/resnet18_imagenet]

Checks the published sha256 prefix (f37072fd) before converting. Offline it stops with a
one-line message saying where to put the file and which convert command to run.
$DPJAX_WEIGHTS_URL replaces torchvision's URL (a mirror, a file:// URL or a local path).

Training does this by itself (`dpjax.weights.ensure_imagenet_checkpoint`, into the cache);
this script puts the file and the checkpoint where you choose.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from dpjax import weights
from weights import convert

DEFAULT_DEST = pathlib.Path(__file__).resolve().parent / weights.TORCHVISION_RESNET18_FILENAME
DOWNLOAD_TIMEOUT_S = weights.DEFAULT_DOWNLOAD_TIMEOUT_S


def _offline_message(url: str, dest: pathlib.Path, reason: object) -> str:
  return (f'weights.fetch: could not download {url} ({reason}); '
          f'without internet, copy {weights.TORCHVISION_RESNET18_FILENAME} to {dest} and run: '
          f'python -m weights.convert --pth={dest}')


def download(dest: pathlib.Path, url: str | None = None) -> None:
  """Downloads to `dest` via a .part file; checks the sha256 prefix before renaming."""
  url = url or weights.imagenet_weights_url()
  dest.parent.mkdir(parents=True, exist_ok=True)
  try:
    weights.download_file(url, dest, timeout_s=DOWNLOAD_TIMEOUT_S, progress=True)
  except weights.WeightsUnavailable as error:
    raise SystemExit(_offline_message(error.url, dest, error.reason)) from None
  except weights.WeightFileError as error:
    raise SystemExit(f'weights.fetch: {error}') from None


def main(argv=None) -> pathlib.Path:
  parser = argparse.ArgumentParser(prog='python -m weights.fetch',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--dest', default=str(DEFAULT_DEST), help='where to keep the .pth file')
  parser.add_argument('--out', default=None, help='orbax checkpoint directory (convert default)')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing --out')
  args = parser.parse_args(argv)
  dest = pathlib.Path(args.dest)
  already_there = False
  if dest.is_file():
    try:
      weights.check_sha256_prefix(dest)
      already_there = True
    except weights.WeightFileError:
      pass  # A damaged earlier download: fetch it again.
  if already_there:
    print(f'{dest} already downloaded (sha256 prefix ok)')
  else:
    download(dest)
  convert_args = [f'--pth={dest}'] + ([f'--out={args.out}'] if args.out else [])
  return convert.main(convert_args + (['--overwrite'] if args.overwrite else []))


if __name__ == '__main__':
  main(sys.argv[1:])
