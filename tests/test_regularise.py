"""Potts/ICM smoothing of the grid labels: off is identity, it lowers the energy, it removes noise."""

import numpy as np

from jule3d import regularise


def _lattice(shape, stride=2, origin=3):
  axes = [origin + stride * np.arange(n) for n in shape]
  return np.stack(np.meshgrid(*axes, indexing='ij'), -1).reshape(-1, 3).astype(np.int32)


def _noisy_two_regions(seed, noise=0.8, shape=(12, 10, 11)):
  centres = _lattice(shape)
  truth = np.where(centres[:, 2] < centres[:, 2].mean(), 1, 2).astype(np.uint8)
  rng = np.random.default_rng(seed)
  # Features: the true class's centroid plus noise that misplaces about a quarter of the points.
  feats = (truth - 1.5)[:, None] + rng.normal(0, noise, (len(truth), 1))
  mu = np.array([[-0.5], [0.5]])
  dist = np.square(feats - mu.T)
  labels = (np.argmin(dist, axis=1) + 1).astype(np.uint8)
  return centres, truth, labels, regularise.unary_terms(dist)


def test_beta_zero_keeps_the_kmeans_labels():
  centres, _, labels, unary = _noisy_two_regions(0)
  out, sweeps = regularise.potts_icm(centres, labels, unary, 2, 0.0)
  np.testing.assert_array_equal(out, labels)
  assert sweeps == 0


def test_icm_lowers_the_energy_and_recovers_regions():
  for seed in range(3):
    centres, truth, labels, unary = _noisy_two_regions(seed)
    beta = 1.0
    out, sweeps = regularise.potts_icm(centres, labels, unary, 2, beta)
    e0 = regularise.potts_energy(centres, labels, unary, 2, beta)
    e1 = regularise.potts_energy(centres, out, unary, 2, beta)
    assert e1 < e0 and sweeps >= 1
    before, after = np.mean(labels != truth), np.mean(out != truth)
    assert before > 0.1 and after < before / 2, (before, after)


def test_unary_is_scale_free():
  rng = np.random.default_rng(1)
  d = rng.random((50, 3))
  np.testing.assert_allclose(regularise.unary_terms(d), regularise.unary_terms(7.0 * d), rtol=1e-6)


def test_sparse_lattice_points_without_neighbours_keep_their_label():
  # Isolated grid points (no 6-neighbour on the lattice) have no pairwise term: k-means decides.
  centres = np.array([[0, 0, 0], [0, 0, 4], [4, 4, 4]], np.int32)
  labels = np.array([1, 2, 1], np.uint8)
  unary = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
  out, _ = regularise.potts_icm(centres, labels, unary, 2, 5.0)
  np.testing.assert_array_equal(out, labels)
