"""A clinical scan as users have it, end to end: a thin, anisotropic int16 CT with an oblique affine.

The case of the issue that found the gaps (512 x 512 x 48 voxels of 0.57 x 0.57 x 5 mm, Hounsfield
units, a reference labelling a small structure and the tissue around it), run with the paper
config's command and CI-size settings: the outputs carry the scan's own affine, the report is
written, and every foreground voxel is labelled.
"""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from helpers import run_cli

SHAPE = (512, 512, 48)
SPACING = (0.57, 0.57, 5.0)
THRESHOLD = -900  # HU: air outside the body (and nothing else) below
# CI-size settings on top of configs/lung_c.py:cpu (27^3 patches, 5^3 kernels as the paper).
TINY = (
  '--config.patches.num_patches=240',
  '--config.model.conv_features=(8,8,8)',
  '--config.model.hidden_dim=64',
  '--config.model.embed_dim=16',
  '--config.cluster.num_clusters=6',
  '--config.cluster.k_s=5',
  '--config.train.epochs_per_period=1',
  '--config.train.batch_size=40',
  '--config.train.num_neg=5',
  '--config.segment.stride=6',
  '--config.segment.kmeans_restarts=2',
  '--config.evaluate.kmeans_restarts=2',
  '--config.evaluate.atropos=False',
)


def oblique_affine(spacing, angle_deg=12.0, origin=(-145.0, 170.5, -60.25)):
  """A CT-like RAS affine: axes flipped in-plane, tilted about the first axis, shifted."""
  t = np.deg2rad(angle_deg)
  rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
  affine = np.eye(4)
  affine[:3, :3] = rot @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
  affine[:3, 3] = origin
  return affine


def synthetic_ct(seed=0):
  """(image int16 HU, reference uint8): a body with two lungs and a small off-centre nodule."""
  rng = np.random.default_rng(seed)
  i, j = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing='ij')
  x, y = (i - 256) * SPACING[0], (j - 256) * SPACING[1]  # mm from the centre
  body = (x / 140) ** 2 + (y / 105) ** 2 <= 1
  lungs = ((x - 60) / 45) ** 2 + (y / 70) ** 2 <= 1
  lungs |= ((x + 60) / 45) ** 2 + (y / 70) ** 2 <= 1
  image = np.full(SHAPE, -1000.0, np.float32)
  image[body] = 40.0
  image[lungs] = -780.0
  z = (np.arange(SHAPE[2]) - 0.5) * SPACING[2]  # mm along the slices
  # A nodule of radius 12 mm in the left lung, 2 slices from the top face: a patch's half-width
  # (13 voxels) from the face would leave it unlabelled without the working grid.
  cx, cy, cz = 70.0, 20.0, z[-3]
  r2 = (x[..., None] - cx) ** 2 + (y[..., None] - cy) ** 2 + (z[None, None, :] - cz) ** 2
  nodule = r2 <= 12.0**2
  image[nodule] = 60.0
  image += rng.normal(0.0, 25.0, SHAPE).astype(np.float32)
  image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
  reference = np.zeros(SHAPE, np.uint8)
  around = (r2 <= 30.0**2) & lungs[..., None] & ~nodule
  reference[around] = 1
  reference[nodule] = 2
  return image, reference


@pytest.fixture(scope='module')
def ct_run(tmp_path_factory):
  folder = tmp_path_factory.mktemp('ct')
  image, reference = synthetic_ct()
  affine = oblique_affine(SPACING)
  nib.save(nib.Nifti1Image(image, affine), str(folder / 'ct.nii.gz'))
  nib.save(nib.Nifti1Image(reference, affine), str(folder / 'ref.nii.gz'))
  workdir = folder / 'run'
  proc = run_cli(
    '--config=configs/lung_c.py:cpu',
    f'--workdir={workdir}',
    f'--config.data.path={folder / "ct.nii.gz"}',
    f'--config.data.threshold={THRESHOLD}',
    f'--config.data.labels={folder / "ref.nii.gz"}',
    *TINY,
    check=True,
  )
  return {'workdir': str(workdir), 'image': image, 'affine': affine, 'log': proc.stderr}


def test_outputs_carry_the_scans_own_geometry(ct_run):
  out = nib.load(os.path.join(ct_run['workdir'], 'segmentation.nii.gz'))
  assert out.shape == SHAPE
  np.testing.assert_allclose(out.affine, ct_run['affine'], atol=1e-5)
  import SimpleITK as sitk

  nrrd = sitk.ReadImage(os.path.join(ct_run['workdir'], 'segmentation.nrrd'))
  assert nrrd.GetSize() == SHAPE
  np.testing.assert_allclose(nrrd.GetSpacing(), SPACING, rtol=1e-6)
  lps = np.diag([-1.0, -1.0, 1.0])
  np.testing.assert_allclose(nrrd.GetOrigin(), lps @ ct_run['affine'][:3, 3], atol=1e-5)
  direction = np.array(nrrd.GetDirection()).reshape(3, 3)
  np.testing.assert_allclose(lps @ direction, ct_run['affine'][:3, :3] / SPACING, atol=1e-6)
  from jule3d import volume

  zarr = volume.open_volume(os.path.join(ct_run['workdir'], 'segmentation.zarr'))
  np.testing.assert_allclose(zarr.affine, ct_run['affine'], atol=1e-9)
  assert 'resampled' in ct_run['log']  # the anisotropic scan ran on a near-isotropic copy


def test_every_foreground_voxel_is_labelled_and_the_report_is_written(ct_run):
  seg = np.asarray(nib.load(os.path.join(ct_run['workdir'], 'segmentation.nii.gz')).dataobj)
  fg = ct_run['image'] >= THRESHOLD
  assert (seg[fg] > 0).all()  # also the slices within half a patch of the faces
  assert (seg[~fg] == 0).mean() > 0.99  # air outside the body stays unlabelled
  with open(os.path.join(ct_run['workdir'], 'report.json')) as f:
    report = json.load(f)
  assert report['coverage']['labelled_fraction'] == 1.0
  assert set(report['nmi']) >= {'jule3d', 'kmeans_intensity', 'multi_otsu'}
  assert os.path.exists(os.path.join(ct_run['workdir'], 'report.md'))


def test_a_thin_anisotropic_scan_is_resampled_padded_and_fully_labelled(tmp_path):
  # 0.5 x 0.5 x 3 mm, 4 slices: 12 mm across, fewer voxels than a 15^3 patch even after resampling
  # to ~0.91 mm, so that axis is also padded by mirroring. No reference: the report still comes.
  rng = np.random.default_rng(3)
  shape, spacing = (64, 60, 4), (0.5, 0.5, 3.0)
  i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing='ij')
  inside = ((i - 32) / 28.0) ** 2 + ((j - 30) / 26.0) ** 2 <= 1
  image = np.where(inside[..., None], 1000.0, 0.0) + np.where(j[..., None] > 30, 300.0, 0.0)
  image = (image * inside[..., None] + rng.normal(0, 40, shape)).astype(np.float32)
  affine = oblique_affine(spacing, angle_deg=-20.0, origin=(10.0, -5.5, 33.0))
  path = tmp_path / 'thin.nii.gz'
  nib.save(nib.Nifti1Image(image, affine), str(path))
  workdir = tmp_path / 'run'
  proc = run_cli(
    '--config=configs/smoke.py',
    f'--workdir={workdir}',
    f'--config.data.path={path}',
    '--config.data.threshold=500',
    check=True,
  )
  assert 'padded by' in proc.stderr and 'resampled from' in proc.stderr
  out = nib.load(str(workdir / 'segmentation.nii.gz'))
  assert out.shape == shape
  np.testing.assert_allclose(out.affine, affine, atol=1e-5)
  seg = np.asarray(out.dataobj)
  fg = image >= 500
  assert (seg[fg] > 0).all()
  with open(workdir / 'report.json') as f:
    report = json.load(f)
  assert not report['reference'] and report['coverage']['labelled_fraction'] == 1.0
  assert report['volume']['working_grid']['pad'][2] == 7  # 15 // 2 on each side of the thin axis
