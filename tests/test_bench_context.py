"""bench/mni152_context.py: its per-voxel inputs, its NMI and its three readings."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import normalized_mutual_info_score

from bench import mni152_context as mc
from jule3d import descriptors


def _volume(seed: int = 0):
  rng = np.random.default_rng(seed)
  t1 = rng.normal(100, 20, (12, 13, 14))
  mask = np.zeros(t1.shape, bool)
  mask[2:10, 3:11, 1:12] = True
  return t1, mask


def test_columns_are_the_intensity_then_its_context_at_the_mask_voxels():
  t1, mask = _volume()
  f = mc.columns(t1, mask, (('smooth', 2.0), ('min', 3), ('max', 3)))
  assert f.shape == (mask.sum(), 4)
  np.testing.assert_array_equal(f[:, 0], t1[mask])
  np.testing.assert_allclose(f[:, 1], ndimage.gaussian_filter(t1, 2.0, mode='mirror')[mask])
  assert np.all(f[:, 2] <= f[:, 0]) and np.all(f[:, 0] <= f[:, 3])
  # The context reaches past the mask: the mask's first voxel (2, 3, 1) sees its outside neighbours.
  assert f[0, 2] == t1[1:4, 2:5, 0:3].min() and f[0, 3] == t1[1:4, 2:5, 0:3].max()
  with pytest.raises(ValueError, match='unknown context'):
    mc.columns(t1, mask, (('median', 3),))


def test_nmi_is_sklearns_geometric_nmi():
  rng = np.random.default_rng(1)
  truth, pred = rng.integers(1, 4, 2000), rng.integers(0, 3, 2000)
  expected = normalized_mutual_info_score(truth, pred, average_method='geometric')
  assert abs(mc.nmi(truth, pred) - expected) < 1e-9
  assert abs(mc.nmi(truth, (truth % 3) + 1) - 1.0) < 1e-12


def test_readings_find_separable_tissues_and_nothing_in_noise():
  rng = np.random.default_rng(2)
  # Three tissues in slabs of a 15 x 10 x 20 block, so that the MRF has neighbours to agree with.
  voxels = np.argwhere(np.ones((15, 10, 20), bool))
  truth = voxels[:, 0] // 5 + 1
  # Integer levels, as the raw uint8 T1: a tree splits between two levels exactly.
  good = descriptors.standardise(np.stack([truth * 10.0 + rng.integers(-2, 3, truth.size)], axis=1))
  noise = descriptors.standardise(rng.normal(size=(truth.size, 2)))
  for f, lo, hi in ((good, 0.99, 1.0), (noise, 0.0, 0.02)):
    r = mc.unsupervised(f, truth, seed=0, voxels=voxels, fit=2000)
    assert set(r) == {'k-means', 'k-means + Potts', 'GMM', 'GMM + Potts'}
    assert all(lo <= v <= hi for v in r.values()), r
    assert lo <= mc.supervised(f, truth, train=1000) <= hi
  assert set(mc.unsupervised(good, truth, seed=0, fit=2000)) == {'k-means', 'GMM'}


def test_potts_repairs_noisy_voxels_in_both_readings():
  rng = np.random.default_rng(3)
  voxels = np.argwhere(np.ones((12, 12, 12), bool))
  truth = voxels[:, 0] // 4 + 1
  # Tissues 10 apart with noise of std 4: about a fifth of the voxels cross a midpoint, each
  # surrounded by voxels of its own tissue.
  level = truth * 10.0 + rng.normal(0, 4.0, truth.size)
  r = mc.unsupervised(
    descriptors.standardise(level[:, None]), truth, seed=0, voxels=voxels, fit=1728
  )
  assert r['k-means + Potts'] > r['k-means'] + 0.1
  assert r['GMM + Potts'] > r['GMM'] + 0.1
