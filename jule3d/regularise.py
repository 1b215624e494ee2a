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
starts from the k-means labels (beta = 0 keeps them exactly). Memory: the lattice's bounding box of
grid points, K float32 unary maps and one int8 label map.
"""

import numpy as np

_SHIFTS = [(a, d) for a in range(3) for d in (-1, 1)]


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


def _neighbour_counts(lat: np.ndarray, k: int) -> np.ndarray:
  """[K, *lat.shape] number of 6-neighbours with each label (label 0 = no grid point)."""
  out = np.zeros((k,) + lat.shape, np.int8)
  padded = np.pad(lat, 1)
  core = tuple(slice(1, -1) for _ in range(3))
  for axis, d in _SHIFTS:
    sl = list(core)
    sl[axis] = slice(1 + d, lat.shape[axis] + 1 + d)
    nb = padded[tuple(sl)]
    for j in range(k):
      out[j] += nb == j + 1
  return out


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
  k = unary.shape[1]
  lo = centres.min(axis=0)
  idx = (centres - lo) // stride
  shape = tuple(int(n) for n in idx.max(axis=0) + 1)
  lat = np.zeros(shape, np.int8)
  i0, i1, i2 = idx[:, 0], idx[:, 1], idx[:, 2]
  lat[i0, i1, i2] = labels
  colour = (i0 + i1 + i2) % 2
  sweeps = 0
  while sweeps < max_sweeps:
    sweeps += 1
    changed = 0
    for c in (0, 1):
      sel = colour == c
      counts = _neighbour_counts(lat, k)[:, i0[sel], i1[sel], i2[sel]].T  # [m, K]
      nb_total = counts.sum(axis=1, keepdims=True)
      energy = unary[sel] + beta * (nb_total - counts)
      new = (np.argmin(energy, axis=1) + 1).astype(np.int8)
      old = lat[i0[sel], i1[sel], i2[sel]]
      changed += int(np.count_nonzero(new != old))
      lat[i0[sel], i1[sel], i2[sel]] = new
    if changed == 0:
      break
  return lat[i0, i1, i2].astype(np.uint8), sweeps


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
  labels = np.asarray(labels)
  data = float(unary[np.arange(len(labels)), labels.astype(np.int64) - 1].sum())
  lo = centres.min(axis=0)
  idx = (centres - lo) // stride
  lat = np.zeros(tuple(int(n) for n in idx.max(axis=0) + 1), np.int16)
  lat[idx[:, 0], idx[:, 1], idx[:, 2]] = labels
  pairs = 0
  for axis in range(3):
    a = np.take(lat, np.arange(lat.shape[axis] - 1), axis=axis)
    b = np.take(lat, np.arange(1, lat.shape[axis]), axis=axis)
    pairs += int(np.count_nonzero((a > 0) & (b > 0) & (a != b)))
  return data + beta * pairs
