"""Patch geometry: sampled centres, batched reads, normalisation statistics."""

import numpy as np
import pytest
from helpers import memory_volume

from jule3d import patches
from jule3d.errors import UserError

_volume = memory_volume


def _random_volume(shape, seed=0, dtype=np.int16):
  rng = np.random.default_rng(seed)
  return rng.integers(-1000, 3000, size=shape).astype(dtype)


@pytest.mark.parametrize('direction', ['above', 'below'])
def test_sampled_centres_are_foreground_inside_unique_and_seeded(direction):
  arr = _random_volume((23, 30, 19))
  vol = _volume(arr)
  w, thr = 7, 1000
  c = patches.sample_centres(vol, 300, w, thr, direction, seed=3, slab_depth=5)
  assert c.shape == (300, 3) and c.dtype == np.int32
  h = w // 2
  assert (c >= h).all() and (c < np.array(arr.shape) - h).all()
  vals = arr[c[:, 0], c[:, 1], c[:, 2]]
  assert (vals >= thr).all() if direction == 'above' else (vals <= thr).all()
  assert len({tuple(x) for x in c}) == 300
  np.testing.assert_array_equal(c, patches.sample_centres(vol, 300, w, thr, direction, 3, 7))
  assert not np.array_equal(c, patches.sample_centres(vol, 300, w, thr, direction, 4, 5))


def test_sampling_is_uniform_over_valid_foreground():
  arr = np.zeros((12, 12, 12), np.uint8)
  arr[3:9, 3:9, 3:9] = 1  # 216 foreground voxels, all valid for w=5.
  vol = _volume(arr)
  hits = np.zeros(arr.shape)
  for seed in range(40):
    c = patches.sample_centres(vol, 108, 5, 1, 'above', seed)
    hits[c[:, 0], c[:, 1], c[:, 2]] += 1
  inside = hits[3:9, 3:9, 3:9]
  assert hits.sum() == inside.sum()
  # Each voxel is drawn with probability 1/2 per seed: 20 +- 3.2 expected of 40.
  assert inside.min() > 5 and inside.max() < 35 and abs(inside.mean() - 20) < 1e-9


def test_too_few_centres_names_the_count():
  arr = np.zeros((20, 20, 20), np.uint16)
  arr[10, 10, 10:13] = 5000
  with pytest.raises(UserError, match=r'only 3 voxels.*num_patches = 10'):
    patches.sample_centres(_volume(arr), 10, 9, 4000, 'above', 0)


def test_patch_larger_than_volume():
  with pytest.raises(UserError, match='axis 2 has 6 voxels'):
    patches.sample_centres(_volume(np.ones((20, 20, 6))), 1, 9, 0, 'above', 0)


def test_batched_reads_equal_numpy_slicing():
  arr = _random_volume((31, 26, 28), seed=5, dtype=np.float32)
  vol = _volume(arr)
  w = 9
  c = patches.sample_centres(vol, 150, w, -2000, 'above', seed=1)
  rng = np.random.default_rng(0)
  c = c[rng.permutation(len(c))]  # reads must come back in the caller's order
  got = patches.read_patches(vol, c, w, slab_depth=4)
  h = w // 2
  want = np.stack([arr[z - h : z + h + 1, y - h : y + h + 1, x - h : x + h + 1] for z, y, x in c])
  np.testing.assert_array_equal(got, want)
  # The iterator reads one box per slab group, not one per patch.
  groups = list(patches.iter_patches(vol, c, w, slab_depth=4))
  assert len(groups) == len(np.unique(c[:, 0] // 4))


def test_patch_stats_and_constant_volume():
  x = np.random.default_rng(0).normal(5.0, 2.0, size=(40, 5, 5, 5)).astype(np.float32)
  mean, std = patches.patch_stats(x, chunk=7)
  assert mean == pytest.approx(x.astype(np.float64).mean(), rel=1e-9)
  assert std == pytest.approx(x.astype(np.float64).std(), rel=1e-9)
  with pytest.raises(UserError, match='same value'):
    patches.patch_stats(np.full((4, 3, 3, 3), 7, np.uint16))
