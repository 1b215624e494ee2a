"""Paper experiment lung-B (Moriya et al. 2018, Table 1): 594x602x624 voxels at 29.63 um, threshold 2820.

Command (the volume is the user's own; it does not ship with jule3d):
  python launch.py --config=configs/lung_b.py --workdir=runs/lung_b --config.data.path=/data/lung_b.zarr

Expected runtime: the paper-size run (10,000 27^3 patches, C = 10, 20 epochs a period) is a GPU
job (see the projection in BENCHMARKS.md). On a 2-core CPU use `--config=configs/lung_b.py:cpu`
(2,000 patches, a narrower CNN, 3 epochs a period), which finishes in minutes. The recommended
method (configs/base.py RECOMMENDED) is on; `:paper` (or `:cpu,paper`) runs the paper's as it is.
Expected result: JULE's NMI above k-means on intensity and multi-threshold Otsu (the paper's
absolute NMIs are modest).
"""

from configs import base


def get_config(arg: str = ''):
  """Returns the lung-B config; `arg`: 'cpu' (CPU size), 'paper' (paper's method), or both."""
  return base.paper_experiment(
    arg, threshold=2820.0, spacing_mm=0.02963, shape=(594, 602, 624), num_clusters=10
  )
