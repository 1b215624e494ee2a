"""JULE's forward pass (method §3), the graph: kNN, edge weights, initial clusters, GDL affinities.

The merge loop that agglomerates the clusters on it is jule3d/merge.py.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


class DegenerateFeatures(ValueError):
  """The features leave nothing to cluster: non-finite values, or all distances 0 (sigma^2 = 0).

  A property of the features a run computed (a collapsed embedding, patches without texture), not a
  programming error: the training loop turns it into a UserError with advice (jule3d/train.py).
  """


def check_features(x, where: str) -> jax.Array:
  """x as float32 (n, d), n >= 2: ValueError for a wrong shape, DegenerateFeatures for NaN/inf."""
  x = jnp.asarray(x, jnp.float32)
  if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
    raise ValueError(
      f'{where}: features have shape {x.shape}; expected (n, d) with n >= 2, d >= 1.'
    )
  if not bool(jnp.isfinite(x).all()):
    raise DegenerateFeatures(f'{where}: features contain NaN or inf; expected finite values.')
  return x


def knn_graph(x: jax.Array, k: int, *, block_size: int = 1024) -> tuple[jax.Array, jax.Array]:
  """The K nearest OTHER samples of every sample by squared Euclidean distance.

  Row blocks of one matmul + `lax.top_k` each, so at most block_size x n distances exist at once.
  Self is excluded by index (a duplicate of sample i at distance 0 is still a neighbour). The
  returned distances are recomputed exactly as ||x_i - x_j||^2 (the matmul form only ranks) and
  each row is sorted by (distance, index).

  Args:
    x: (n, d) features.
    k: neighbours per sample, 1 <= k <= n - 1.
    block_size: rows per distance block.

  Returns:
    (idx, d2): (n, k) int32 neighbour indices and (n, k) float32 squared distances, ascending.

  Raises:
    ValueError: bad shape or k out of range (DegenerateFeatures: non-finite features).
  """
  x = check_features(x, 'knn_graph')
  n = x.shape[0]
  if not (isinstance(k, (int, np.integer)) and 1 <= k <= n - 1):
    raise ValueError(
      f'knn_graph: k = {k!r} neighbours for {n} samples; expected 1 <= k <= {n - 1}.'
    )
  block = max(8, min(int(block_size), -(-n // 8) * 8))
  return _knn(x, int(k), block)


@functools.partial(jax.jit, static_argnames=('k', 'block'))
def _knn(x: jax.Array, k: int, block: int) -> tuple[jax.Array, jax.Array]:
  n = x.shape[0]
  num_blocks = -(-n // block)
  xp = jnp.pad(x, ((0, num_blocks * block - n), (0, 0)))
  sq = jnp.sum(x * x, axis=1)
  cols = jnp.arange(n)

  def one_block(b):
    rows = lax.dynamic_slice_in_dim(xp, b * block, block)
    rid = b * block + jnp.arange(block)
    # HIGHEST: GPUs/TPUs would otherwise rank neighbours with reduced-precision matmuls.
    dot = jnp.matmul(rows, x.T, precision=lax.Precision.HIGHEST)
    d2 = jnp.sum(rows * rows, axis=1)[:, None] + sq[None, :] - 2.0 * dot
    d2 = jnp.where(rid[:, None] == cols[None, :], jnp.inf, d2)
    _, ids = lax.top_k(-d2, k)
    exact = jnp.sum((rows[:, None, :] - x[ids]) ** 2, axis=-1)
    exact, ids = lax.sort((exact, ids.astype(jnp.int32)), dimension=1, num_keys=2)
    return ids, exact

  ids, d2 = lax.map(one_block, jnp.arange(num_blocks))
  k_ = ids.shape[-1]
  return ids.reshape(-1, k_)[:n], d2.reshape(-1, k_)[:n]


def knn_weights(d2: jax.Array, a: float) -> tuple[jax.Array, float]:
  """Directed edge weights W_ij = exp(-d_ij^2 / sigma^2), sigma^2 = a * mean(d2).

  Args:
    d2: (n, K_s) squared kNN distances (from knn_graph).
    a: the config's cluster.a.

  Returns:
    (w, sigma2): (n, K_s) float32 weights and sigma^2 as a Python float.

  Raises:
    DegenerateFeatures: sigma^2 is not a positive finite number (all features identical, or a <= 0).
  """
  d2 = jnp.asarray(d2, jnp.float32)
  mean = float(jnp.mean(d2))
  sigma2 = float(a) * mean
  if not (math.isfinite(sigma2) and sigma2 > 0):
    raise DegenerateFeatures(
      f'kNN graph: sigma^2 = a * mean squared kNN distance = {a} * {mean:.3g} = {sigma2:.3g}; '
      'expected a positive finite value (a > 0 and features that are not all identical).'
    )
  return jnp.exp(-d2 / sigma2), sigma2


def renumber(labels: np.ndarray | jax.Array) -> np.ndarray:
  """Relabels to 0..N-1 in order of first appearance (deterministic for a given partition).

  Args:
    labels: (n,) integer labels, any values.

  Returns:
    (n,) int32 labels 0..N-1; sample 0 has label 0, the next new cluster 1, and so on.
  """
  labels = np.asarray(labels).reshape(-1)
  _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
  rank = np.empty(len(first), np.int32)
  rank[np.argsort(first, kind='stable')] = np.arange(len(first), dtype=np.int32)
  return rank[inverse.reshape(-1)]


def initial_clusters(idx: jax.Array) -> np.ndarray:
  """Weakly connected components of the directed 1-NN graph i -> idx[i, 0].

  Every node has out-degree 1, so each component holds exactly one cycle; pointer jumping finds
  for every node the smallest index on its component's cycle (log2(n) jitted rounds).

  Args:
    idx: (n, K) kNN indices (from knn_graph); only column 0 is used.

  Returns:
    (n,) int32 labels 0..N0-1 numbered in order of first appearance.
  """
  return renumber(_cycle_minimum(jnp.asarray(idx, jnp.int32)[:, 0]))


@jax.jit
def _cycle_minimum(nn1: jax.Array) -> jax.Array:
  n = nn1.shape[0]
  rounds = max(1, math.ceil(math.log2(n)))

  # After round t, jump[i] = nn1 applied 2^t times and low[i] = min index on those 2^t path nodes.
  def body(_, carry):
    jump, low = carry
    return jump[jump], jnp.minimum(low, low[jump])

  jump, low = lax.fori_loop(0, rounds, body, (nn1, jnp.arange(n, dtype=nn1.dtype)))
  # 2^rounds >= n steps lead onto the cycle; a path of 2^rounds nodes from there covers it.
  return low[jump]


def _gdl_unnormalised(idx, w, lab, num_slots: int):
  # A_us[r, c] = sum over edges u -> v with u in C_r, v in C_c of W[u, v] * out_r(v), where
  # out_r(v) = sum of v's edges into C_r: the same sum as sum_{v in C_c} in_r(v) out_r(v).
  nl = lab[idx]
  out = jnp.sum(w[idx] * (nl[idx] == lab[:, None, None]), axis=-1)
  flat = (lab[:, None] * num_slots + nl).reshape(-1)
  a_us = jax.ops.segment_sum((w * out).reshape(-1), flat, num_segments=num_slots * num_slots)
  return a_us.reshape(num_slots, num_slots)


def affinity_terms(idx, w, lab, num_slots: int, fill: float):
  """Traceable core of gdl_affinity (also the merge loop's start): (A, A_us, cluster sizes).

  A holds `fill` on the diagonal and for empty slots (gdl_affinity: 0; the merge loop: -inf).
  """
  a_us = _gdl_unnormalised(idx, w, lab, num_slots)
  sizes = jnp.zeros(num_slots, jnp.int32).at[lab].add(1)
  active = sizes > 0
  keep = active[:, None] & active[None, :] & ~jnp.eye(num_slots, dtype=bool)
  s = jnp.where(active, sizes, 1).astype(a_us.dtype)
  b = a_us / (s * s)[:, None]
  return jnp.where(keep, b + b.T, fill), a_us, sizes


@functools.partial(jax.jit, static_argnames=('num_slots',))
def _gdl(idx, w, lab, num_slots: int):
  aff, a_us, _ = affinity_terms(idx, w, lab, num_slots, 0.0)
  return aff, a_us


def gdl_affinity(
  idx: jax.Array, w: jax.Array, labels: jax.Array, num_slots: int
) -> tuple[jax.Array, jax.Array]:
  """Exact graph-degree-linkage affinities of all cluster pairs, from the sparse edges.

  Args:
    idx: (n, K_s) kNN indices.
    w: (n, K_s) edge weights W[i, idx[i, k]].
    labels: (n,) int cluster labels in 0..num_slots-1.
    num_slots: static padded cluster count (>= labels.max() + 1).

  Returns:
    (A, A_us): (num_slots, num_slots) float32. A_us[r, c] = sum_{v in C_c} in_r(v) out_r(v) (its
    diagonal is the within-cluster sum); A[i, j] = A_us[i, j] / |C_i|^2 + A_us[j, i] / |C_j|^2,
    symmetric, 0 on the diagonal and for empty slots.
  """
  labels = jnp.asarray(labels, jnp.int32)
  return _gdl(jnp.asarray(idx, jnp.int32), jnp.asarray(w, jnp.float32), labels, int(num_slots))
