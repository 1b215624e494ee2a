"""The working grid (jule3d/working.py): resampling anisotropic scans, padding thin ones, the way back."""

import numpy as np
import pytest

from jule3d import volume, working


def test_plan_leaves_near_isotropic_volumes_alone():
  assert working.plan((40, 40, 40), (1.0, 1.0, 1.2), 15, 1.5) is None
  assert working.plan((40, 40, 40), (0.5, 0.5, 3.0), 15, 0.0) is None  # resampling switched off


def test_plan_resamples_to_the_geometric_mean_over_the_same_extent():
  g = working.plan((100, 100, 12), (0.5, 0.5, 3.0), 15, 1.5)
  edge = (0.5 * 0.5 * 3.0) ** (1 / 3)  # 0.9086
  assert g.size == (round(50 / edge), round(50 / edge), round(36 / edge))
  edges = [s * k for s, k in zip((0.5, 0.5, 3.0), g.scale, strict=True)]
  assert max(edges) / min(edges) < 1.05  # near-isotropic
  for n, s, m, e in zip((100, 100, 12), (0.5, 0.5, 3.0), g.size, edges, strict=True):
    assert m * e == pytest.approx(n * s)  # the same physical extent
  assert g.pad == (0, 0, 0)
  g = working.plan((100, 100, 12), (0.5, 0.5, 3.0), 15, 1.5, resample_spacing=1.0)
  assert g.size == (50, 50, 36)


def test_plan_pads_axes_thinner_than_a_patch():
  g = working.plan((40, 6, 40), (1.0, 1.0, 1.0), 15, 1.5)
  assert g.size == (40, 6, 40) and g.pad == (0, 7, 0) and g.shape == (40, 20, 40)
  assert not g.resampled


def _vol(tmp_path, array, spacing, affine=None, name='v.zarr'):
  path = str(tmp_path / name)
  volume.save_zarr(path, array, spacing, affine)
  return volume.open_volume(path)


def test_padding_mirrors_the_volume_any_width(tmp_path):
  rng = np.random.default_rng(0)
  a = rng.integers(-500, 500, (30, 4, 25)).astype(np.int16)  # axis 1 thinner than the pad
  g = working.plan(a.shape, (1.0, 1.0, 1.0), 17, 1.5)
  assert g.pad == (0, 8, 0)
  got = working.sample(_vol(tmp_path, a, (1.0, 1.0, 1.0)), g, 0, a.shape[0])
  assert got.dtype == np.int16
  np.testing.assert_array_equal(got, np.pad(a, ((0, 0), (8, 8), (0, 0)), mode='symmetric'))


def test_resampling_is_trilinear_at_the_aligned_centres(tmp_path):
  z, y, x = np.meshgrid(np.arange(12), np.arange(20), np.arange(22), indexing='ij')
  a = (3.0 * z + 0.5 * y - 0.25 * x).astype(np.float32)  # linear: interpolation is exact inside
  g = working.plan(a.shape, (3.0, 0.5, 0.5), 9, 1.5)
  assert g.resampled and g.size[0] > 12
  vol = _vol(tmp_path, a, (3.0, 0.5, 0.5))
  starts = range(0, g.shape[0], 7)  # slab by slab, as the working copy is written
  got = np.concatenate([working.sample(vol, g, z0, min(z0 + 7, g.shape[0])) for z0 in starts])
  assert got.shape == g.shape and got.dtype == np.float32
  cz, cy, cx = (g.input_coordinates(a_, np.arange(g.shape[a_])) for a_ in range(3))
  want = 3.0 * cz[:, None, None] + 0.5 * cy[None, :, None] - 0.25 * cx[None, None, :]
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_working_affine_maps_to_the_same_world(tmp_path):
  theta = np.deg2rad(30)
  rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
  affine = np.eye(4)
  affine[:3, :3] = rot @ np.diag([0.5, 0.5, 3.0])
  affine[:3, 3] = [-12.0, 40.5, 7.25]
  a = np.zeros((16, 16, 6), np.int16)
  vol = _vol(tmp_path, a, (0.5, 0.5, 3.0), affine)
  g = working.plan(a.shape, vol.spacing, 15, 1.5)
  assert g.resampled and g.pad == (7, 7, 0)  # 16 x 0.5 mm -> 9 voxels: thinner than a patch
  wvol = working.working_volume(vol, g, str(tmp_path / 'cache'))
  assert wvol.shape == g.shape
  p = np.array([[7, 7, 0], [10, 12, 5], [15, 15, 19], [0, 3, 2]], np.float64)
  lo, hi = np.array(g.pad), np.array(g.pad) + np.array(g.size)
  x = (p - lo + 0.5) * np.array(g.scale) - 0.5  # voxel centres aligned over the same extent
  inside = np.all((p >= lo) & (p < hi), axis=1)  # the padding samples the mirrored volume instead
  assert inside.sum() == 3
  world_w = (wvol.affine @ np.c_[p, np.ones(len(p))].T).T[inside, :3]
  world_i = (affine @ np.c_[x, np.ones(len(x))].T).T[inside, :3]
  np.testing.assert_allclose(world_w, world_i, atol=1e-9)
  again = working.working_volume(vol, g, str(tmp_path / 'cache'))  # cached: the same copy
  assert again.path == wvol.path


def test_labels_go_back_to_the_nearest_working_voxel(tmp_path):
  g = working.plan((10, 30, 31), (3.0, 0.5, 0.5), 9, 1.5)
  rng = np.random.default_rng(1)
  lab = rng.integers(1, 4, g.shape).astype(np.uint8)
  labels = _vol(tmp_path, lab, (1.0, 1.0, 1.0), name='lab.zarr')
  back = np.concatenate(
    [working.to_input(labels, g, z0, min(z0 + 4, 10)) for z0 in range(0, 10, 4)]
  )
  assert back.shape == g.input_shape
  for idx in [(0, 0, 0), (9, 29, 30), (4, 13, 7)]:
    w = [g.nearest_working(a, np.array([idx[a]]))[0] for a in range(3)]
    # the nearest working centre: its input coordinate is within half a working voxel
    for a in range(3):
      assert abs(g.input_coordinates(a, np.array([w[a]]))[0] - idx[a]) <= 0.5 * g.scale[a] + 1e-9
    assert back[idx] == lab[tuple(w)]


def test_input_voxels_of_working_points_round_to_the_nearest():
  g = working.plan((10, 30, 31), (3.0, 0.5, 0.5), 9, 1.5)
  pts = np.array([[0, 0, 0], [g.shape[0] - 1, g.shape[1] - 1, g.shape[2] - 1], [5, 3, 2]])
  got = g.input_voxels(pts)
  for a in range(3):
    x = g.input_coordinates(a, pts[:, a])
    assert np.all(np.abs(got[:, a] - x) <= 0.5) and got[:, a].min() >= 0
    assert got[:, a].max() < g.input_shape[a]
