"""Real data: the MNI152 2009 T1 template (shipped inside nilearn's wheel) into K = 3 tissues.

Command (installs nilearn from requirements-mni152.txt, then runs):
  make mni152
  # or: python launch.py --config=configs/mni152.py --workdir=runs/mni152

Scored against argmax(CSF = 1 - GM - WM, GM, WM) inside the brain mask T1/255 > 0.2 (raw uint8
values, see jule3d/datasets.py), next to k-means on intensity and multi-Otsu on the same voxels.
Expected runtime: about 2 minutes on 2 CPU cores (the recommended method's CPU size, the demo's:
2,000 17^3 patches, a narrow CNN, configs/base.py CPU_SIZE; Atropos is half of it). Expected result
(README "Results"): jule3d NMI 0.57-0.58 over run seeds 0-2, below k-means on intensity
(0.68-0.69), multi-Otsu (0.68) and Atropos (0.71). `:paper` (at the CPU size this config shipped
with: 3,000 15^3 patches, C = 30, 3 epochs a period): 0.16-0.19.
"""

from configs import base


def get_config(arg: str = ''):
  """Returns the MNI152 config; `arg='paper'` keeps the paper's method (no extension)."""
  c = base.get_config()
  c.data.builtin = 'mni152'
  c.data.threshold = 52.0  # raw T1 >= 52  <=>  T1/255 > 0.2, the brain mask of the protocol
  base.cpu_size(c)  # the recommended method's CPU size, the demo's and scan.py's (base.py)
  if 'paper' not in base.parse_arg(arg, ('paper',)):
    c.segment.stride = 1  # the recommended method's stride for a volume this small (base.py)
    return base.method(c, paper=False)
  # The paper's method as the project shipped it (tests/data/paper_configs.json), at the CPU size
  # this config had then: CPU_SIZE but for 15^3 patches (15 -> 13 -> 6 -> 4 -> 2), 3,000 of them,
  # C = 30 and 3 epochs a period.
  c.patches.patch_size = 15
  c.patches.num_patches = 3000
  c.cluster.num_clusters = 30
  c.train.epochs_per_period = 3
  c.segment.stride = 3
  return base.method(c, paper=True)
