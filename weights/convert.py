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
  prefix = None if args.skip_sha256_check else weights.TORCHVISION_RESNET18_SHA256_PREFIX
  try:
    converted = weights.convert_torchvision_file(
        source, out, arch=args.arch, num_classes=args.num_classes, sha256_prefix=prefix,
        overwrite=args.overwrite)
  except FileExistsError:
    raise SystemExit(f'weights.convert: {out} already exists; pass --overwrite to replace it') from None
  except weights.WeightFileError as error:
    hint = '; pass --skip_sha256_check to convert it anyway' if 'sha256' in str(error) else ''
    raise SystemExit(f'weights.convert: {error}{hint}') from None
  except OSError as error:
    raise SystemExit(f'weights.convert: {error}') from None
  print(f'Converted {source} (sha256 {converted.sha256[:16]}..., {converted.num_params:,} '
        f'parameters) to {converted.path}')
  return converted.path


if __name__ == '__main__':
  main(sys.argv[1:])
