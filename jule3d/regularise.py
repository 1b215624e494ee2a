"""Spatial regularisation of the segmentation's k-means labels: a Potts model on the grid (an extension).

k-means labels every grid patch on its own, so a patch whose feature lies between two centroids
flips between segments from one grid point to the next. Classical tissue tools (Atropos, the
GMM + MRF of FSL FAST / SPM) add a Markov random field prior that prefers neighbours to share a
label. Here the same idea runs on the stride-s lattice of grid centres, with k-means' own geometry
as the data term:

  E(L) = sum_m U[m, L_m] + beta * sum_(m, n 6-neighbours) [L_m != L_n],
  U[m, k] = ||f_m - mu_k||^2 / d,   d = mean_m min_k ||f_m - mu_k||^2,

so beta is in units of the mean k-means distortion (scale-free: the same beta suits any feature
space). The energy is lowered by iterated conditional modes (Besag 1986) with checkerboard
updates: the two colour classes of the lattice are updated in turn, each voxel taking the label of
least local energy given its neighbours; every half-sweep can only lower E, so it converges. It
starts from the k-means labels (beta = 0 keeps them exactly). Memory: one uint8 label map over the
bounding box of the grid points (plus a border of 0, "no grid point"), and the [M, K] data term.
"""

import numpy as np

_OFFSETS = np.array([(d if a == 0 else 0, d if a == 1 else 0, d if a == 2 else 0)
                     for a in range(3) for d in (-1, 1)])  # fmt: skip


def unary_terms(distances_sq: np.ndarray) -> np.ndarray:
  """Data term U[m, k]: squared distances to the centroids over their mean minimum.

  Args:
    distances_sq: [M, K] squared distances of every grid feature to every k-means centroid.

  Returns:
    [M, K] float32.
  """
  d = distances_sq.astype(np.float64)
  scale = float(np.mean(d.min(axis=1))) if len(d) else 1.0
  return (d / (scale if scale > 0 else 1.0)).astype(np.float32)


def _lattice(centres: np.ndarray, labels: np.ndarray, stride: int):
  """The labels on their lattice with a border of 0, and each centre's lattice index in it."""
  idx = (centres - centres.min(axis=0)) // stride + 1
  lat = np.zeros(tuple(int(n) for n in idx.max(axis=0) + 2), np.uint8)
  lat[tuple(idx.T)] = labels
  return lat, idx


def _neighbours(lat: np.ndarray, idx: np.ndarray) -> np.ndarray:
  """[m, 6] labels of the 6-neighbours of the lattice points idx (0 = no grid point)."""
  return np.stack([lat[tuple((idx + o).T)] for o in _OFFSETS], axis=1)


def potts_icm(
  centres: np.ndarray,
  labels: np.ndarray,
  unary: np.ndarray,
  stride: int,
  beta: float,
  max_sweeps: int = 10,
) -> tuple[np.ndarray, int]:
  """Lowers the Potts energy above by checkerboard ICM, starting from `labels`.

  Args:
    centres: [M, 3] grid centres (on a lattice of step `stride`).
    labels: [M] initial labels 1..K (the k-means labels).
    unary: [M, K] data term (unary_terms).
    stride: lattice step s.
    beta: pairwise weight (0: labels returned unchanged).
    max_sweeps: full sweeps at most (each sweep updates both colours once).

  Returns:
    ([M] uint8 labels 1..K, sweeps run until no label changed or max_sweeps).
  """
  labels = np.asarray(labels, np.uint8)
  if beta <= 0 or len(centres) == 0:
    return labels.copy(), 0
  values = np.arange(1, unary.shape[1] + 1, dtype=np.uint8)
  lat, idx = _lattice(centres, labels, stride)
  colours = [np.flatnonzero((idx - 1).sum(axis=1) % 2 == c) for c in (0, 1)]
  sweeps = 0
  while sweeps < max_sweeps:
    sweeps += 1
    changed = 0
    for sel in colours:  # a colour's points are not neighbours of each other: update them at once
      nb = _neighbours(lat, idx[sel])
      present = np.count_nonzero(nb, axis=1)
      # beta per neighbour whose label differs from the candidate's
      disagree = np.stack([present - np.count_nonzero(nb == v, axis=1) for v in values], axis=1)
      new = values[np.argmin(unary[sel] + beta * disagree, axis=1)]
      at = tuple(idx[sel].T)
      changed += int(np.count_nonzero(new != lat[at]))
      lat[at] = new
    if changed == 0:
      break
  return lat[tuple(idx.T)], sweeps


def potts_energy(
  centres: np.ndarray, labels: np.ndarray, unary: np.ndarray, stride: int, beta: float
) -> float:
  """E(L) of the model above (for tests and diagnostics).

  Args:
    centres: [M, 3] grid centres.
    labels: [M] labels 1..K.
    unary: [M, K] data term.
    stride: lattice step.
    beta: pairwise weight.

  Returns:
    The energy, each neighbour pair counted once.
  """
  labels = np.asarray(labels, np.uint8)
  data = float(unary[np.arange(len(labels)), labels.astype(np.int64) - 1].sum())
  lat, idx = _lattice(centres, labels, stride)
  nb = _neighbours(lat, idx)
  pairs = int(np.count_nonzero((nb > 0) & (nb != labels[:, None]))) // 2  # each pair seen twice
  return data + beta * pairs
