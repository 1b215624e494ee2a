"""Your own scan: CT, MRI or micro-CT in any supported format, the recommended method, CPU-sized.

Commands (README "Your own volume"):
  python launch.py --config=configs/scan.py --workdir=runs/ct --config.data.path=ct.nii.gz
  python launch.py --config=configs/scan.py --workdir=runs/ct --config.data.path=scan.nrrd \
      --config.data.threshold=-500 --config.data.labels=scan-label.nrrd
  python launch.py --config=configs/scan.py --workdir=runs/ct --config.data.path=/data/dicom/series1
  python launch.py --config=configs/scan.py --workdir=runs/uct --config.data.path=/data/slices \
      --config.data.spacing=0.03,0.03,0.03

Geometry comes from the file (NIfTI, NRRD, MetaImage, DICOM, zarr attributes, ImageJ TIFF): every
output carries the input's own affine. config.data.spacing is needed only for inputs that carry
none (npy, plain zarr, TIFF without resolution tags). The foreground threshold defaults to Otsu's
on the histogram (logged, and written in the report); give config.data.threshold in the scan's units
(e.g. -500 HU for a CT's body, 2000 for the phantom) where Otsu's split is not the specimen.
Anisotropic scans are resampled to near-isotropic voxels of the same voxel volume and volumes
thinner than a patch are padded by reflection (jule3d/working.py): the labels come back on the
scan's own grid, every foreground voxel labelled.

The patch is 15 voxels of the working grid (15 mm at 1 mm: tissue boundaries a few mm apart), the
CNN is CPU-sized (as configs/mni152.py), and the grid stride is 2 (a label per 2^3 block, then the
fill): set --config.segment.stride=1 for volumes under ~10^7 voxels (every voxel its own patch), as
configs/demo.py and configs/mni152.py do. Measured on 2 CPU cores, a 512 x 512 x 48 CT (12.6 million
voxels, 0.57 x 0.57 x 5 mm, resampled to 248 x 248 x 204): training 50 s, segmentation 18 s, the
report 4 min, nearly all of it the Atropos baseline (--config.evaluate.atropos=False skips it).
"""

from configs import base


def get_config(arg: str = ''):
  """Returns the own-scan config; `arg='paper'` keeps the paper's method (no extension)."""
  c = base.get_config()
  c.data.threshold = 'otsu'
  c.patches.patch_size = 15
  c.patches.num_patches = 3000
  c.model.conv_features = (16, 16, 16)
  c.model.kernel_size = 3  # 15 -> 13 -> 6 -> 4 -> 2
  c.model.hidden_dim = 128
  c.model.embed_dim = 32
  c.model.init_std = 0.05  # narrow CNN: see configs/demo.py (0.01 collapses the embedding)
  c.cluster.num_clusters = 30
  c.train.epochs_per_period = 3
  c.segment.stride = 2
  return base.method(c, paper='paper' in base.parse_arg(arg, ('paper',)))
