"""Synthetic micro-CT lung phantom with ground truth: the built-in demo and test data.

The command line of jule3d.phantom (`python -m jule3d.phantom`, see the package docstring).
"""

import argparse
import json
import sys
from collections.abc import Sequence

from jule3d.errors import UserError
from jule3d.phantom.analysis import region_statistics, separability
from jule3d.phantom.generate import make_phantom
from jule3d.phantom.store import write_phantom


def main(argv: Sequence[str] | None = None) -> int:
  """Command line: writes the phantom (see the module docstring).

  Args:
    argv: arguments without the program name (default: sys.argv[1:]).

  Returns:
    Exit status: 0, or 2 after a one-line error on stderr.
  """
  ap = argparse.ArgumentParser(prog='python -m jule3d.phantom', description=__doc__.split('\n')[0])
  ap.add_argument('--out', required=True, help='output folder')
  ap.add_argument('--shape', default='96,96,96', help='z,y,x voxels (default 96,96,96)')
  ap.add_argument('--seed', type=int, default=0, help='phantom seed (default 0)')
  ap.add_argument('--spacing', default='0.03,0.03,0.03', help='voxel edge per axis, mm')
  ap.add_argument('--stats', action='store_true', help='print region statistics and NMIs')
  args = ap.parse_args(argv)
  try:
    shape = _parse_tuple(args.shape, int, '--shape')
    spacing = _parse_tuple(args.spacing, float, '--spacing')
    paths = write_phantom(args.out, shape, args.seed, spacing=spacing)
    print(json.dumps(paths, indent=1))
    if args.stats:
      image, labels = make_phantom(shape, args.seed)
      print(json.dumps({'regions': region_statistics(image, labels)}, indent=1))
      print(json.dumps(separability(image, labels), indent=1))
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


def _parse_tuple(text, kind, flag):
  try:
    values = tuple(kind(v) for v in text.split(','))
  except ValueError:
    values = ()
  if len(values) != 3:
    raise UserError(f'{flag}={text!r}: expected three comma-separated numbers, e.g. 96,96,96.')
  return values
