"""Converts a local torchvision ResNet-18 file into a Flax (orbax) checkpoint.

  python -m weights.convert --pth=weights/resnet18-f37072fd.pth [--out=weights/resnet18_imagenet]

The default output is where `dpjax.weights.find_imagenet_checkpoint()` looks
(weights/resnet18_imagenet, or $DPJAX_WEIGHTS_DIR). The file's sha256 must start with
torchvision's published prefix f37072fd unless --skip_sha256_check is given (for other
files, e.g. a .safetensors export).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from dpjax import weights


def parse_args(argv):
  parser = argparse.ArgumentParser(prog='python -m weights.convert',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--pth', required=True,
                      help=f'torchvision {weights.TORCHVISION_RESNET18_FILENAME} (or .safetensors)')
  parser.add_argument('--out', default=None,
                      help=f'orbax checkpoint directory '
                           f'(default {weights.imagenet_checkpoint_dir()})')
  parser.add_argument('--skip_sha256_check', action='store_true',
                      help=f'convert a file whose sha256 does not start with '
                           f'{weights.TORCHVISION_RESNET18_SHA256_PREFIX}')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing --out')
  parser.add_argument('--arch', default='resnet18', choices=('resnet18', 'tiny'),
                      help='layout of the file (tiny: the test model)')
  parser.add_argument('--num_classes', type=int, default=weights.IMAGENET_NUM_CLASSES)
  return parser.parse_args(argv)


def main(argv=None) -> pathlib.Path:
  args = parse_args(argv)
  source = pathlib.Path(args.pth)
  out = pathlib.Path(args.out) if args.out else weights.imagenet_checkpoint_dir()
  try:
    if not source.is_file():
      raise FileNotFoundError(f'{source} does not exist; see weights/README.md for how to get it')
    if args.skip_sha256_check:
      sha256 = weights.sha256_of_file(source)
    else:
      try:
        sha256 = weights.check_sha256_prefix(source)
      except weights.WeightFileError as error:
        raise weights.WeightFileError(
            f'{error}; pass --skip_sha256_check to convert it anyway') from None
    variables = weights.load_torchvision(source, arch=args.arch, num_classes=args.num_classes)
    saved = weights.save_checkpoint(variables, out, overwrite=args.overwrite)
  except (OSError, weights.WeightFileError) as error:
    raise SystemExit(f'weights.convert: {error}') from None
  num_params = sum(v.size for v in _leaves(variables['params']))
  print(f'Converted {source} (sha256 {sha256[:16]}..., {num_params:,} parameters) to {saved}')
  return saved


def _leaves(tree):
  for value in tree.values():
    yield from (_leaves(value) if isinstance(value, dict) else (value,))


if __name__ == '__main__':
  main(sys.argv[1:])
