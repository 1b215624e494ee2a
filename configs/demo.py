"""Demo: the whole pipeline on the built-in micro-CT phantom, sized for a 2-core CPU.

Command (what `make demo` runs):
  python launch.py --config=configs/demo.py --workdir=runs/demo

Expected runtime: about a minute on 2 CPU cores (phantom generation, JULE training, stride-1
segmentation, evaluation with three baselines and report). Expected result (README "Results"):
jule3d NMI 0.72-0.73 over run seeds 0-2, against k-means on intensity 0.05, multi-Otsu 0.05 and
Atropos 0.07: the phantom's regions differ in texture, not in mean intensity. `:paper`: 0.10-0.18.
"""

from configs import base


def get_config(arg: str = ''):
  """Returns the demo config; `arg='paper'` keeps the paper's method (no extension)."""
  c = base.get_config()
  c.data.phantom_shape = (96, 96, 96)
  c.data.phantom_seed = 0
  c.data.threshold = 2000.0  # Phantom units: air ~1000, tissue ~3000-6000 (see jule3d/phantom.py).
  c.patches.patch_size = 17
  c.patches.num_patches = 2000
  c.model.conv_features = (16, 16, 16)
  c.model.kernel_size = 3  # 17 -> 15 -> 7 -> 5 -> 3, as the paper's 27 -> ... -> 3.
  c.model.hidden_dim = 128
  c.model.embed_dim = 32
  # Narrow layers need a larger init than the paper's N(0, 0.01^2): with 0.01 the embedding before
  # L2 normalisation is tiny, the first SGD steps blow up the last bias and every embedding collapses
  # to one point (loss pinned at the margin), even when training on the true labels (measured).
  c.model.init_std = 0.05
  c.cluster.num_clusters = 20
  c.train.epochs_per_period = 2
  c.segment.stride = 4
  paper = 'paper' in base.parse_arg(arg, ('paper',))
  if not paper:
    c.segment.stride = 1  # the recommended method's stride for a volume this small (base.py)
  return base.method(c, paper=paper)
