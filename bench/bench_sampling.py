"""Sampling memory and streaming speed on a lung-C-sized volume (477 x 454 x 971 uint16 zarr).

  .venv/bin/python bench/bench_sampling.py [--write]

Creates the volume once under /tmp (slab by slab), then, in a fresh subprocess so the peak RSS is
the sampler's own, samples the paper's 10,000 27^3 foreground patches and reads them through
tensorstore; the same patches are then cut from an in-memory numpy copy for comparison.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

SHAPE = (477, 454, 971)
PATH = '/tmp/jule3d_bench_lungc.zarr'


def make_volume() -> None:
  from jule3d import volume

  if os.path.isdir(PATH):
    return
  rng = np.random.default_rng(0)
  zz, yy, xx = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
  with volume.zarr_writer(PATH, SHAPE, np.uint16, (0.02951,) * 3) as store:
    for z0 in range(0, SHAPE[0], 64):
      z1 = min(z0 + 64, SHAPE[0])
      # An ellipsoidal specimen (~45% of the box above threshold 4700) with noise.
      r = ((zz[z0:z1] - 238) / 230.0) ** 2 + ((yy - 227) / 220.0) ** 2 + ((xx - 485) / 470.0) ** 2
      base = np.where(r < 1.0, 6000, 2000)
      slab = base + rng.normal(0, 600, (z1 - z0, SHAPE[1], SHAPE[2]))
      store[z0:z1].write(np.clip(slab, 0, 65535).astype(np.uint16)).result()


def child() -> None:
  from jule3d import patches, volume

  vol = volume.open_volume(PATH)
  t0 = time.time()
  centres = patches.sample_centres(vol, 10_000, 27, 4700.0, 'above', seed=0)
  t1 = time.time()
  p = patches.read_patches(vol, centres, 27)
  t2 = time.time()
  mean, std = patches.patch_stats(p)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  # Peer: the same patches cut from the whole volume held in memory as numpy.
  arr = vol.read((0, 0, 0), vol.shape)
  t3 = time.time()
  h = 13
  q = np.stack(
    [arr[z - h : z + h + 1, y - h : y + h + 1, x - h : x + h + 1] for z, y, x in centres]
  )
  t4 = time.time()
  assert np.array_equal(p, q)
  mb = p.nbytes / 1e6
  print(
    json.dumps(
      {
        'sample_s': t1 - t0,
        'read_s': t2 - t1,
        'peak_rss_mb': peak,
        'patches_mb': mb,
        'tensorstore_mb_s': mb / (t2 - t1),
        'numpy_mb_s': mb / (t4 - t3),
        'mean': mean,
        'std': std,
      }
    )
  )


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument('--write', action='store_true', help='update BENCHMARKS.md')
  ap.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    child()
    return
  make_volume()
  out = subprocess.run(
    [sys.executable, __file__, '--child'], capture_output=True, text=True, check=True
  )
  r = json.loads(out.stdout.strip().splitlines()[-1])
  rows = [
    ('sample 10,000 foreground centres (2 streaming passes)', f'{r["sample_s"]:.2f} s'),
    (
      'read 10,000 27^3 patches through tensorstore',
      f'{r["read_s"]:.2f} s ({r["tensorstore_mb_s"]:.0f} MB/s)',
    ),
    ('same patches cut from an in-memory numpy array', f'{r["numpy_mb_s"]:.0f} MB/s'),
    ('tensorstore / numpy throughput', f'{r["tensorstore_mb_s"] / r["numpy_mb_s"]:.2f}'),
    (
      'peak RSS of sampling + reading (before the numpy peer)',
      f'{r["peak_rss_mb"]:.0f} MB (patches {r["patches_mb"]:.0f} MB; target < 2000 MB)',
    ),
  ]
  table = '| what | figure |\n|---|---|\n' + '\n'.join(f'| {a} | {b} |' for a, b in rows)
  common.publish(
    'Patch sampling and streaming (lung-C size)',
    'bench/bench_sampling.py --write',
    table,
    args.write,
  )


if __name__ == '__main__':
  main()
