"""Paper experiment lung-C (Moriya et al. 2018, Table 1): 477x454x971 voxels at 29.51 um, threshold 4700.

Command (the volume is the user's own; it does not ship with jule3d):
  python launch.py --config=configs/lung_c.py --workdir=runs/lung_c --config.data.path=/data/lung_c.zarr

Expected runtime: the paper-size run (10,000 27^3 patches, C = 100, 20 epochs a period) is a GPU
job (see the projection in BENCHMARKS.md). On a 2-core CPU use `--config=configs/lung_c.py:cpu`
(2,000 patches, a narrower CNN, 3 epochs a period), which finishes in minutes. The recommended
method (configs/base.py RECOMMENDED) is on; `:paper` (or `:cpu,paper`) runs the paper's as it is.
Expected result: JULE's NMI above k-means on intensity and multi-threshold Otsu (the paper's
absolute NMIs are modest).
"""

from configs import base


def get_config(arg: str = ''):
  """Returns the lung-C config; `arg`: 'cpu' (CPU size), 'paper' (paper's method), or both."""
  return base.paper_experiment(
    arg, threshold=4700.0, spacing_mm=0.02951, shape=(477, 454, 971), num_clusters=100
  )
