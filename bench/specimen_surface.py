"""Which voxels get a label: the 'specimen' domain, or its envelope (`segment.fill_envelope`).

For the built-in phantom at each size and phantom seed, the specimen's interior (jule3d/specimen.py)
is computed as the pipeline does, and two voxel sets are compared with the phantom's ground truth:
'domain', where patches are centred (the coarse band of the face-connected background is outside,
all of it), and 'envelope', where the fill labels with `fill_envelope` (the band's voxels that a
closing of the foreground by a ball of radius `outside_block` fills are inside):

  left out   the specimen's voxels (label > 0, what the report scores) outside the set: they get no
             label
  taken in   voxels of the air around the specimen (label 0) inside the set, as a share of the
             specimen (labelled, but never scored: the annotation holds no outside air)
  seconds    interior() on the volume, read from a zarr: without the envelope (one pass) and with
             it (a second pass, the closing)

  python bench/specimen_surface.py [--sizes=96,128] [--seeds=0,1,2] [--timing=256] [--write]
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from configs import demo  # noqa: E402
from jule3d import patches, phantom, specimen, volume  # noqa: E402

SETS = ('domain', 'envelope')


def _interiors(image: np.ndarray, threshold: float, block: int) -> list:
  """[(Interior, seconds)] without and with the envelope."""
  with tempfile.TemporaryDirectory() as tmp:
    volume.save_zarr(os.path.join(tmp, 'image.zarr'), image, (1.0, 1.0, 1.0))
    vol = volume.open_volume(os.path.join(tmp, 'image.zarr'))
    out = []
    for envelope in (False, True):
      t0 = time.perf_counter()
      inner = specimen.interior(vol, threshold, 'above', block, envelope=envelope)
      out.append((inner, time.perf_counter() - t0))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--sizes', default='96,128')
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--timing', default='256', help='cube edge of the timing-only phantom, 0: none')
  p.add_argument('--write', action='store_true', help='update BENCHMARKS.md')
  a = p.parse_args(argv)
  c = demo.get_config()
  threshold, block = c.data.threshold, c.patches.outside_block
  head = ['phantom', 'seed']
  for name in SETS:
    head += [f'{name}: left out', f'{name}: taken in']
  head += ['s, one pass', 's, with the envelope']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for n in (int(v) for v in a.sizes.split(',')):
    for seed in (int(v) for v in a.seeds.split(',')):
      image, full = phantom.make_phantom((n, n, n), seed)
      fg = patches.foreground(image, threshold, 'above')
      coords = tuple(np.arange(k) for k in image.shape)
      cells = [f'{n}^3', str(seed)]
      got = _interiors(image, threshold, block)
      inner = got[1][0]
      for envelope in (False, True):
        dom = inner.inside(fg, *coords, envelope=envelope)
        out = (full > 0) & ~dom
        cells += [
          f'{out.sum() / (full > 0).sum():.1%}',
          f'{(dom & (full == 0)).sum() / (full > 0).sum():.1%}',
        ]
      cells += [f'{seconds:.2f}' for _, seconds in got]
      lines.append('| ' + ' | '.join(cells) + ' |')
      print(lines[-1], flush=True)
  n = int(a.timing)
  if n:
    image, _ = phantom.make_phantom((n, n, n), 0)
    got = _interiors(image, threshold, block)
    cells = [f'{n}^3 (timing)', '0', '', '', '', '', *[f'{s:.2f}' for _, s in got]]
    lines.append('| ' + ' | '.join(cells) + ' |')
  table = '\n'.join(lines)
  common.publish('Specimen surface', common.command_line('specimen_surface.py'), table, a.write)
  return 0


if __name__ == '__main__':
  sys.exit(main())
