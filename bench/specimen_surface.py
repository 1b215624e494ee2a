"""Which voxels the 'specimen' domain holds, with the outside found in blocks or voxel by voxel.

For the built-in phantom at each size and phantom seed, the specimen's interior
(`jule3d/specimen.py`, `config.patches.outside_surface`) is computed with 'blocks' (the coarse band
of the face-connected background, all of it outside) and 'voxels' (that band refined by a closing
with a ball of radius `outside_block`), against the phantom's full ground truth:

  left out   the specimen's voxels (label > 0) outside the domain: they get no label and count
             against every annotated slice they cross; also as a share of the annotated voxels
  taken in   voxels of the air around the specimen (label 0) inside the domain, as a share of the
             specimen (labelled, but never scored: the annotation holds no outside air)
  seconds    interior() on the volume, read from a zarr (the second pass is the closing)

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

SURFACES = ('blocks', 'voxels')


def _interiors(image: np.ndarray, threshold: float, block: int) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    volume.save_zarr(os.path.join(tmp, 'image.zarr'), image, (1.0, 1.0, 1.0))
    vol = volume.open_volume(os.path.join(tmp, 'image.zarr'))
    out = {}
    for s in SURFACES:
      t0 = time.perf_counter()
      inner = specimen.interior(vol, threshold, 'above', block, s)
      out[s] = (inner, time.perf_counter() - t0)
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
  for s in SURFACES:
    head += [f'{s}: left out (annotated)', f'{s}: taken in', f'{s}: s']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for n in (int(v) for v in a.sizes.split(',')):
    for seed in (int(v) for v in a.seeds.split(',')):
      image, full = phantom.make_phantom((n, n, n), seed)
      annotated = phantom.annotate_slices(full) > 0
      fg = patches.foreground(image, threshold, 'above')
      coords = tuple(np.arange(k) for k in image.shape)
      cells = [f'{n}^3', str(seed)]
      for inner, seconds in _interiors(image, threshold, block).values():
        dom = inner.inside(fg, *coords)
        out = (full > 0) & ~dom
        cells += [
          f'{out.sum() / (full > 0).sum():.1%} ({out[annotated].mean():.1%})',
          f'{(dom & (full == 0)).sum() / (full > 0).sum():.1%}',
          f'{seconds:.2f}',
        ]
      lines.append('| ' + ' | '.join(cells) + ' |')
      print(lines[-1], flush=True)
  n = int(a.timing)
  if n:
    image, _ = phantom.make_phantom((n, n, n), 0)
    got = _interiors(image, threshold, block)
    cells = [f'{n}^3 (timing)', '0']
    for _, seconds in got.values():
      cells += ['', '', f'{seconds:.2f}']
    lines.append('| ' + ' | '.join(cells) + ' |')
  table = '\n'.join(lines)
  common.publish('Specimen surface', common.command_line('specimen_surface.py'), table, a.write)
  return 0


if __name__ == '__main__':
  sys.exit(main())
