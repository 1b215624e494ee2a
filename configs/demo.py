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
  c = base.cpu_size(base.get_config())  # the CPU size (17^3 patches: 17 -> 15 -> 7 -> 5 -> 3)
  c.data.phantom_shape = (96, 96, 96)
  c.data.phantom_seed = 0
  c.data.threshold = 2000.0  # Phantom units: air ~1000, tissue ~3000-6000 (see jule3d/phantom.py).
  c.segment.stride = 4
  paper = 'paper' in base.parse_arg(arg, ('paper',))
  if not paper:
    c.segment.stride = 1  # the recommended method's stride for a volume this small (base.py)
  return base.method(c, paper=paper)
