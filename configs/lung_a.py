"""Paper experiment lung-A (Moriya et al. 2018, Table 1): 756x520x545 voxels at 27.1 um, threshold 4000.

Command (the volume is the user's own; it does not ship with jule3d):
  python launch.py --config=configs/lung_a.py --workdir=runs/lung_a --config.data.path=/data/lung_a.zarr

Expected runtime: the paper-size run (10,000 27^3 patches, C = 100, 20 epochs a period) is a GPU
job (see the projection in BENCHMARKS.md). On a 2-core CPU use `--config=configs/lung_a.py:cpu`
(2,000 patches, a narrower CNN, 3 epochs a period), which finishes in minutes. The recommended
method (configs/base.py RECOMMENDED) is on; `:paper` (or `:cpu,paper`) runs the paper's as it is.
Expected result: JULE's NMI above k-means on intensity and multi-threshold Otsu (the paper's
absolute NMIs are modest).
"""

from configs import base


def get_config(arg: str = ''):
  """Returns the lung-A config; `arg`: 'cpu' (CPU size), 'paper' (paper's method), or both."""
  return base.paper_experiment(
    arg, threshold=4000.0, spacing_mm=0.02710, shape=(756, 520, 545), num_clusters=100
  )
