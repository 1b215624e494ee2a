"""Real data: the MNI152 2009 T1 template (shipped inside nilearn's wheel) into K = 3 tissues.

Command (installs nilearn from requirements-mni152.txt, then runs):
  make mni152
  # or: python launch.py --config=configs/mni152.py --workdir=runs/mni152

Scored against argmax(CSF = 1 - GM - WM, GM, WM) inside the brain mask T1/255 > 0.2 (raw uint8
values, see jule3d/datasets.py), next to k-means on intensity and multi-Otsu on the same voxels.
Expected runtime: about 2 minutes on 2 CPU cores (CPU-size settings: 3,000 15^3 patches, a narrow
CNN; Atropos is half of it). Expected result (README "Results"): jule3d NMI 0.56-0.59 over run
seeds 0-2, below k-means on intensity (0.68-0.69), multi-Otsu (0.68) and Atropos (0.71).
`:paper`: 0.16-0.19.
"""

from configs import base


def get_config(arg: str = ''):
  """Returns the MNI152 config; `arg='paper'` keeps the paper's method (no extension)."""
  c = base.get_config()
  c.data.builtin = 'mni152'
  c.data.threshold = 52.0  # raw T1 >= 52  <=>  T1/255 > 0.2, the brain mask of the protocol
  c.patches.patch_size = 15  # 15 mm at 1 mm: tissue boundaries are a few mm apart
  c.patches.num_patches = 3000
  c.model.conv_features = (16, 16, 16)
  c.model.kernel_size = 3  # 15 -> 13 -> 6 -> 4 -> 2
  c.model.hidden_dim = 128
  c.model.embed_dim = 32
  c.cluster.num_clusters = 30
  c.model.init_std = 0.05  # narrow CNN: see configs/demo.py (0.01 collapses the embedding)
  c.train.epochs_per_period = 3
  c.segment.stride = 3
  paper = 'paper' in base.parse_arg(arg, ('paper',))
  if not paper:
    c.segment.stride = 1  # the recommended method's stride for a volume this small (base.py)
  return base.method(c, paper=paper)
