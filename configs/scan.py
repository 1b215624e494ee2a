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

Network and training run at the recommended method's CPU size, the demo's and MNI152's
(configs/base.py CPU_SIZE: 2,000 patches of 17^3 voxels of the working grid, 17 mm at 1 mm, a
narrow CNN, C = 20, 2 epochs a period), and the grid stride is 2 (a label per 2^3 block, then the
fill): set --config.segment.stride=1 for volumes under ~10^7 voxels (every voxel its own patch), as
configs/demo.py and configs/mni152.py do. Measured on 2 CPU cores, a 512 x 512 x 48 CT (12.6
million voxels, 0.57 x 0.57 x 5 mm, resampled to 248 x 248 x 204; tests/test_clinical.py's
synthetic_ct, --config.data.threshold=-500): training 22 s, segmentation 16 s (11 s reading the
embedding: its trained features hold no three groups, so the recommended segment.layer = 'auto'
reads the CNN's hidden layer), the report 3 s without the Atropos baseline
(--config.evaluate.atropos=False), which adds about 4 min.
"""

from configs import base


def get_config(arg: str = ''):
  """Returns the own-scan config; `arg='paper'` keeps the paper's method (no extension)."""
  c = base.get_config()
  c.data.threshold = 'otsu'
  base.cpu_size(c)  # the CPU size of the demo and MNI152 (configs/base.py CPU_SIZE)
  c.segment.stride = 2
  return base.method(c, paper='paper' in base.parse_arg(arg, ('paper',)))
