"""groups.py: k-means of features, and whether they hold K groups (no labels)."""

import numpy as np
import pytest

from jule3d import groups


def _blobs(centres, n, rng):
  return np.concatenate([c + 0.05 * rng.standard_normal((n, len(c))) for c in centres]).astype(
    np.float32
  )


@pytest.mark.parametrize('k', [2, 3, 4])
def test_group_structure_separates_k_groups_from_a_continuum(k):
  rng = np.random.default_rng(0)
  fit = (0, 3, 100_000)
  distinct = _blobs(np.eye(4)[:k] * 3, 2000, rng)
  fewer = _blobs(np.eye(4)[: k - 1] * 3, 3000, rng)  # one group fewer than segments
  continuum = rng.uniform(0, 1, (6000, 1)).astype(np.float32)
  got = {}
  for name, x in (('distinct', distinct), ('fewer', fewer), ('continuum', continuum)):
    got[name] = groups.structure(x, groups.kmeans_labels(x, k, *fit)[1], *fit)
  assert got['distinct']['distinct'] and got['distinct']['ratio'] < 0.05
  assert not got['fewer']['distinct'] and not got['continuum']['distinct']
  # A uniform 1-D continuum: k-means leaves 1 / k^2 of the variance with k clusters.
  assert abs(got['continuum']['unexplained_k'] - 1 / k**2) < 0.01
  assert abs(got['continuum']['ratio'] - ((k - 1) / k) ** 2) < 0.02
  assert got['continuum']['continuum_ratio'] == round(((k - 1) / k) ** 2, 4)
