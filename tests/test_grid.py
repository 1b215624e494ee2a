"""The stride grid: its centres, lattice indices, resumable parts and the blocks labels paint."""

import itertools

import numpy as np
import pytest
from helpers import memory_volume

from jule3d import grid
from jule3d.errors import UserError


def _random_volume(shape, seed=0):
  return np.random.default_rng(seed).integers(-1000, 3000, size=shape).astype(np.int16)


@pytest.mark.parametrize('shape', [(20, 21, 22), (19, 17, 25), (13, 13, 13)])
@pytest.mark.parametrize('w,s', [(5, 3), (7, 5), (9, 4), (13, 13)])
def test_grid_matches_brute_force(shape, w, s):
  arr = _random_volume(shape, seed=sum(shape) + w)
  vol = memory_volume(arr)
  got = grid.centres(vol, w, s, 500, 'above', slab_depth=2)
  h = w // 2
  want = [c for c in itertools.product(*(range(h, n - h, s) for n in shape)) if arr[c] >= 500]
  np.testing.assert_array_equal(got, np.array(want, dtype=np.int32).reshape(-1, 3))
  # Every candidate position is on the stride lattice starting at the first valid centre.
  axes = grid.axes(shape, w, s)
  assert [len(a) for a in axes] == [len(range(h, n - h, s)) for n in shape]


@pytest.mark.parametrize('stride', [1, 2, 4, 5])
def test_paint_covers_each_block_with_its_label(stride):
  shape = (23, 19, 21)
  rng = np.random.default_rng(stride)
  h = 4
  axes = [np.arange(h, n - h, stride) for n in shape]
  points = np.stack(np.meshgrid(*axes, indexing='ij'), -1).reshape(-1, 3)
  keep = rng.random(len(points)) < 0.6
  centres = points[keep].astype(np.int32)
  labels = rng.integers(1, 4, len(centres)).astype(np.uint8)
  want = np.zeros(shape, np.uint8)
  lo = stride // 2
  for (z, y, x), lab in zip(centres, labels, strict=True):
    want[z - lo : z - lo + stride, y - lo : y - lo + stride, x - lo : x - lo + stride] = lab
  got = np.concatenate(
    [
      grid.paint_slab(z0, min(z0 + 6, shape[0]), shape, centres, labels, stride)
      for z0 in range(0, shape[0], 6)
    ]
  )
  np.testing.assert_array_equal(got, want)
  # Blocks tile: every covered voxel belongs to exactly one centre's block.
  assert (got > 0).sum() == len(centres) * stride**3


@pytest.mark.parametrize(
  'shape,w,s', [((20, 21, 22), 5, 3), ((13, 13, 13), 13, 13), ((9, 30, 8), 9, 4)]
)
def test_shape_of_counts_the_axes_points(shape, w, s):
  assert grid.shape_of(shape, w, s) == tuple(len(a) for a in grid.axes(shape, w, s))
  assert grid.shape_of((w - 1, 30, 30), w, s)[0] == 0  # no patch fits along axis 0


def test_index_and_parts_follow_the_grid_planes():
  w, s = 7, 3
  axes = grid.axes((40, 12, 12), w, s)
  centres = np.stack(np.meshgrid(*axes, indexing='ij'), -1).reshape(-1, 3)
  idx = grid.index(centres, w, s)
  # Lattice index i of an axis is the voxel w // 2 + i * s.
  np.testing.assert_array_equal(w // 2 + idx * s, centres)
  part = grid.parts(centres, w, s, planes_per_part=4)
  np.testing.assert_array_equal(part, idx[:, 0] // 4)
  # Every part holds whole grid planes: a plane never spans two parts.
  for plane in np.unique(idx[:, 0]):
    assert len(np.unique(part[idx[:, 0] == plane])) == 1


@pytest.mark.parametrize(
  'requested,w,s,multiple,want',
  [
    (0, 15, 1, 1, 120),
    (0, 15, 5, 1, 24),
    (0, 5, 10, 1, 8),
    (0, 15, 1, 7, 126),
    (3, 15, 1, 1, 3),
    (3, 15, 1, 4, 4),
  ],
)
def test_part_planes_rule(requested, w, s, multiple, want):
  # >= 8 patch edges along axis 0 (at least 8 planes), rounded up to whole dense blocks.
  assert grid.part_planes(requested, w, s, multiple) == want


def test_require_refuses_fewer_grid_patches_than_segments():
  grid.require(3, 3, 5)
  with pytest.raises(UserError, match=r'only 2 grid patches \(stride 5\).*num_segments = 3'):
    grid.require(2, 3, 5)
