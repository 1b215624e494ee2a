"""Synthetic micro-CT lung specimen with ground truth: the built-in demo and test data.

The paper's volumes (method §1, §6) are micro-CT scans of lung specimens holding invasive carcinoma,
non-invasive carcinoma and normal tissue. This phantom imitates them in the way that matters for
the method: the three classes differ in TEXTURE, not in intensity.

Image: uint16 in scanner-like raw units. Air (outside the specimen and inside alveoli) is ~1000,
tissue ~2000-5000 (foreground mean ~3000), Gaussian noise of std 80 after a Gaussian PSF. The
foreground threshold is `THRESHOLD` = 2000 (`>= 2000` is specimen tissue) for every seed and
shape: air stays below it by more than 10 noise stds, and ~70-95 % of each region's voxels pass.

Labels (uint8):
  0  background: air outside the specimen
  1  normal tissue: alveolar foam, thin dense walls (~1.8 voxels before blur) around air spaces
     ~6-9 voxels across (Voronoi/Worley foam, cell pitch 9)
  2  non-invasive carcinoma: the same foam with thickened walls (~2.8 voxels) and the air spaces
     partly filled (low-density material, below the threshold)
  3  invasive carcinoma: solid tissue with a mottled density (fine and coarse random fields)

The specimen is a smooth random blob with air around it. The three regions are sectors around an
axis close to array axis 0 (so most axial slices show all three) with noisy boundaries; each holds
25-50 % of the specimen. Per-region densities are calibrated so that the regions' mean intensity
over all voxels and over foreground voxels agree within ~8 %, while the local std (7^3 window)
falls from normal (~830) over non-invasive (~550) to invasive (~350): intensity k-means on the
foreground cannot separate the regions (NMI < 0.1), a local-std texture feature can (NMI ~0.6-0.7
at 96^3-128^3); `region_statistics` and `separability` measure this. All lengths are in voxels,
so the texture looks the same in a 13-27 voxel patch whatever the volume's shape.

The package: generate (the image and its labels), annotate (the annotated slices), store (written
once per arguments, reused), analysis (region statistics, the hand-made texture feature), cli.

CLI (skips the work when the outputs already exist for the same arguments):
  python -m jule3d.phantom --out DIR --shape 96,96,96 --seed 0 [--spacing 0.03,0.03,0.03] [--stats]
"""

from jule3d.phantom.analysis import region_statistics, separability, texture_feature
from jule3d.phantom.annotate import NUM_ANNOTATED_SLICES, annotate_slices, annotation_positions
from jule3d.phantom.cli import main
from jule3d.phantom.generate import (
  AIR,
  LABEL_NAMES,
  MIN_SIZE,
  THRESHOLD,
  PhantomParams,
  make_phantom,
)
from jule3d.phantom.store import VERSION, write_phantom

__all__ = [
  'AIR',
  'LABEL_NAMES',
  'MIN_SIZE',
  'NUM_ANNOTATED_SLICES',
  'PhantomParams',
  'THRESHOLD',
  'VERSION',
  'annotate_slices',
  'annotation_positions',
  'main',
  'make_phantom',
  'region_statistics',
  'separability',
  'texture_feature',
  'write_phantom',
]
