"""Real data that ships inside an installed package: the MNI152 2009 template from nilearn's wheel.

Nothing is downloaded: nilearn carries the T1 template and the GM/WM probability maps. The
reference labels follow the issue's protocol on the raw uint8 values (so ties are deterministic):
inside the brain mask T1/255 > 0.2, label = 1 + argmax(CSF, GM, WM) with CSF = 255 - GM - WM
(clipped at 0; ties go to the first of CSF, GM, WM); 0 outside the mask.
"""

import importlib.util
import os

import nibabel as nib
import numpy as np

from jule3d import volume
from jule3d.errors import UserError

_FILE = 'mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz'
MASK_THRESHOLD = 52  # raw T1 value: T1 / 255 > 0.2  <=>  T1 >= 52
LABEL_NAMES = {1: 'CSF', 2: 'GM', 3: 'WM'}


def nilearn_data_dir() -> str:
  """Folder of nilearn's packaged templates.

  Returns:
    The path.

  Raises:
    UserError: nilearn is not installed.
  """
  spec = importlib.util.find_spec('nilearn')
  if spec is None or not spec.submodule_search_locations:
    raise UserError(
      'the MNI152 config needs nilearn (it ships the template): run `make mni152`, or '
      '`.venv/bin/pip install -r requirements-mni152.txt`.'
    )
  return os.path.join(list(spec.submodule_search_locations)[0], 'datasets', 'data')


def mni152_labels(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
  """Tissue labels from the raw uint8 template and probability maps (see module docstring).

  Args:
    t1: raw T1 values (uint8).
    gm: raw GM probabilities (uint8, 255 = 1).
    wm: raw WM probabilities (uint8, 255 = 1).

  Returns:
    uint8 labels: 0 outside the brain mask, 1 CSF, 2 GM, 3 WM.
  """
  gm = gm.astype(np.int16)
  wm = wm.astype(np.int16)
  csf = np.clip(255 - gm - wm, 0, None)
  labels = (np.argmax(np.stack([csf, gm, wm]), axis=0) + 1).astype(np.uint8)
  labels[t1 < MASK_THRESHOLD] = 0
  return labels


def mni152_files() -> dict[str, str]:
  """Paths of the template's raw T1 and GM/WM probability maps in nilearn's folder.

  Returns:
    {'t1': path, 'gm': path, 'wm': path}.
  """
  data = nilearn_data_dir()
  return {k: os.path.join(data, _FILE.format(k)) for k in ('t1', 'gm', 'wm')}


def prepare_mni152(outdir: str) -> dict[str, str]:
  """The T1 path (in nilearn's folder, opened as NIfTI) and a labels zarr written once to outdir.

  Args:
    outdir: where labels.zarr goes.

  Returns:
    {'image': T1 .nii.gz path, 'labels': labels.zarr path}.
  """
  paths = mni152_files()
  labels_path = os.path.join(outdir, 'labels.zarr')
  if not os.path.isdir(labels_path):
    os.makedirs(outdir, exist_ok=True)
    imgs = {k: nib.load(p) for k, p in paths.items()}
    arrays = {k: np.asarray(im.dataobj) for k, im in imgs.items()}
    labels = mni152_labels(arrays['t1'], arrays['gm'], arrays['wm'])
    t1 = imgs['t1']
    volume.save_zarr(
      labels_path,
      labels.astype(np.uint8),
      t1.header.get_zooms()[:3],
      t1.affine,
      label_names={str(k): v for k, v in LABEL_NAMES.items()},
    )
  return {'image': paths['t1'], 'labels': labels_path}
