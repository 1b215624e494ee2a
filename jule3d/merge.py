"""JULE's forward pass (method §3), the agglomeration: the jitted merge loop and the periods.

The graph and the affinities it starts from are jule3d/graph.py.

Clusters live in `slots`: the input labels 0..Nc-1, padded to a static size P (a few buckets, so
periods of different sizes share compilations). A merge of slots i and j keeps the lower slot.
Deterministic tie-break everywhere: the lowest slot index wins, for equal scores (which cluster
merges), for equal affinities (with which partner) and, in the centroid fallback, for equal
distances (lowest pair (i, j), i < j, in row-major order).

Memory is O(n * K_s + P^2): W stays sparse (idx[n, K_s], w[n, K_s]); the unnormalised affinities
`A_us` and the symmetric affinities `A` are dense P x P. After a merge of a and b into m, A_us's
column m is the sum of columns a and b, its row m is recomputed from C_m's members' edges (their
slots are kept contiguous in a permutation, so finding them is cheap), and A's row and column m
follow; everything else is unchanged. Each cluster caches its top-K_c affinities: a merge rebuilds
only the caches that lost an entry an uncached value could replace, and inserts the new A[i, m]
into the others. Per merge that is O(n * K_s + |C_m| * K_s + P * K_c) plus a few P x P row/column
accesses, never an O(P^2) pass.

Results are exact up to float32 rounding, so on near-ties two implementations (or CPU vs GPU) can
take different but equally valid merges.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jule3d import graph

# Default static chunk sizes of the merge loop (merge_period's `chunks`): members of the merged
# cluster gathered per pass, and cache rows rebuilt per pass. Bigger clusters or more rows to
# rebuild just take more passes.
CHUNKS = (64, 16)


def slot_bucket(num_clusters: int, k_c: int = 1) -> int:
  """Static padded cluster count: the smallest 2^k or 3 * 2^k >= num_clusters (at least 16).

  Args:
    num_clusters: clusters to hold.
    k_c: K_c; the padding leaves room for a top-K_c over the slots.

  Returns:
    The padded slot count P (at most 1.5x num_clusters, so P^2 memory at most ~2.3x).
  """
  need = max(16, int(num_clusters), int(k_c) + 1)
  p = 16
  while p < need:
    p = p * 3 // 2 if p & (p - 1) == 0 else p * 4 // 3
  return p


class _Loop(NamedTuple):
  step: jax.Array
  lab: jax.Array  # (n,) slot of every sample
  nl: jax.Array  # (n, K_s) slot of every edge's target, lab[idx]
  order: jax.Array  # (n + member chunk,) samples grouped by slot, then padding n
  start: jax.Array  # (P,) where each active slot's members begin in `order`
  sizes: jax.Array  # (P,) int32 members per slot, 0 = inactive
  fsum: jax.Array  # (P, d) feature sums, for the centroid fallback
  a_us: jax.Array  # (P, P) unnormalised affinities A_us
  aff: jax.Array  # (P, P) symmetric affinities; only entries between active slots are meaningful
  top_v: jax.Array  # (K_c, P) per slot, its top affinities by (value desc, slot asc)
  top_i: jax.Array  # (K_c, P) their slots; P = empty entry (value -inf)
  log: jax.Array  # (P, 2) merged (best-scoring slot, its most affine slot) per step


def _top(rows, num_slots: int, k_c: int):
  """Top-K_c of each row as (K_c, rows) arrays: the slot axis last vectorises cache updates."""
  v, i = lax.top_k(rows, k_c)  # ties: lower slot first, the loop's tie-break rule
  return v.T, jnp.where(v == -jnp.inf, num_slots, i).astype(jnp.int32).T


def _top_of_candidates(v, i, k: int):
  """Top-k by (value desc, slot asc), empties last, of a few (c, P) candidates per column."""
  # A rank count over candidate pairs: elementwise work, unlike a comparator sort.
  c = v.shape[0]
  va, vb = v[:, None], v[None, :]
  ia, ib = i[:, None], i[None, :]
  pos = jnp.arange(c)
  earlier = (pos[None, :] < pos[:, None])[:, :, None]
  before = (vb > va) | ((vb == va) & ((ib < ia) | ((ib == ia) & earlier)))
  rank = jnp.sum(before, axis=1)  # (c, P): a permutation of 0..c-1 per column
  hit = rank[None] == jnp.arange(k)[:, None, None]  # (k, c, P)
  return jnp.max(jnp.where(hit, v[None], -jnp.inf), axis=1), jnp.max(
    jnp.where(hit, i[None], -1), axis=1
  )


def _closest_centroids(fsum, sizes, active):
  num_slots = sizes.shape[0]
  mu = fsum / jnp.where(active, sizes, 1).astype(fsum.dtype)[:, None]
  sq = jnp.sum(mu * mu, axis=1)
  d = sq[:, None] + sq[None, :] - 2.0 * jnp.matmul(mu, mu.T, precision=lax.Precision.HIGHEST)
  s = jnp.arange(num_slots)
  ok = active[:, None] & active[None, :] & (s[:, None] < s[None, :])
  flat = jnp.argmin(jnp.where(ok, d, jnp.inf))
  return (flat // num_slots).astype(jnp.int32), (flat % num_slots).astype(jnp.int32)


def _merged_row(idx, w, nl, m, members, first, count, num_slots: int, chunk: int):
  """A_us[m, :] from the edges of C_m's members, members[first:first + count], in chunks."""
  n = nl.shape[0]
  # out_m(v) for every v: one pass over all n x K_s edges, so each member edge then costs O(1)
  # instead of O(K_s) (a large cluster would otherwise cost |C_m| K_s^2 per merge).
  out_m = jnp.sum(jnp.where(nl == m, w, 0.0), axis=1)

  def body(t, row):
    u = lax.dynamic_slice_in_dim(members, first + t * chunk, chunk)
    ok = (t * chunk + jnp.arange(chunk) < count)[:, None]
    u = jnp.minimum(u, n - 1)
    val = jnp.where(ok, w[u] * out_m[idx[u]], 0.0)  # W[u, v] out_m(v) for the members' edges
    return row + jax.ops.segment_sum(val.reshape(-1), nl[u].reshape(-1), num_segments=num_slots)

  chunks = (count + chunk - 1) // chunk
  return lax.fori_loop(0, chunks, body, jnp.zeros(num_slots, w.dtype))


def _join_blocks(order, start, m, r, size_m, size_r):
  """Moves slot r's block of `order` to just after slot m's (m < r), shifting the blocks between.

  Blocks start in slot order (a stable argsort) and stay in it, since the merged block keeps the
  lower slot's place: r's block always lies after m's. Elementwise work over n plus one gather:
  cheaper on CPU than finding C_m's members with jnp.nonzero (a cumulative sum) after each merge.
  """
  lo, sr = start[m] + size_m, start[r]
  k = jnp.arange(order.shape[0])
  src = jnp.where(k < lo + size_r, sr + (k - lo), k - size_r)
  order = order[jnp.where((k >= lo) & (k < sr + size_r), src, k)]
  return order, jnp.where((start >= lo) & (start < sr), start + size_r, start)


def _initial_state(x, idx, w, lab, p: int, k_c: int, member_chunk: int) -> _Loop:
  """The loop's state before the first merge: affinities, top-K_c caches, member blocks."""
  n = lab.shape[0]
  aff, a_us, sizes = graph.affinity_terms(idx, w, lab, p, -jnp.inf)
  top_v, top_i = _top(aff, p, k_c)
  fsum = jax.ops.segment_sum(x, lab, num_segments=p)
  log = jnp.zeros((p, 2), jnp.int32)
  order = jnp.argsort(lab, stable=True).astype(jnp.int32)
  order = jnp.concatenate([order, jnp.full(member_chunk, n, jnp.int32)])  # chunks never clamp
  start = (jnp.cumsum(sizes) - sizes).astype(jnp.int32)
  return _Loop(jnp.int32(0), lab, lab[idx], order, start, sizes, fsum, a_us, aff, top_v, top_i, log)


@functools.partial(jax.jit, static_argnames=('num_slots', 'k_c', 'chunks'))
def _merge_loop(x, idx, w, lab, num_merges, lam, *, num_slots: int, k_c: int, chunks):
  # One traced while-loop; `step` is a closure over the loop's static sizes and the graph.
  p = num_slots
  member_chunk, row_chunk = chunks
  slots = jnp.arange(p)
  init = _initial_state(x, idx, w, lab, p, k_c, member_chunk)

  def step(st: _Loop) -> _Loop:
    active = st.sizes > 0
    best = st.top_v[0]
    has = active & (st.top_i[0] < p)
    score = best
    if k_c > 1:
      gaps = jnp.where(st.top_i[1:] < p, best - st.top_v[1:], 0.0)
      score = best + lam / (k_c - 1) * jnp.sum(gaps, axis=0)
    score = jnp.where(has, score, -jnp.inf)
    i = jnp.argmax(score).astype(jnp.int32)
    all_zero = jnp.max(jnp.where(has, best, -jnp.inf)) <= 0
    i, j = lax.cond(
      all_zero,
      lambda: _closest_centroids(st.fsum, st.sizes, active),
      lambda: (i, st.top_i[0, i]),
    )
    m, r = jnp.minimum(i, j), jnp.maximum(i, j)

    lab = jnp.where(st.lab == r, m, st.lab)
    nl = jnp.where(st.nl == r, m, st.nl)
    order, start = _join_blocks(st.order, st.start, m, r, st.sizes[m], st.sizes[r])
    sizes = st.sizes.at[m].add(st.sizes[r]).at[r].set(0)
    fsum = st.fsum.at[m].add(st.fsum[r]).at[r].set(0.0)
    active = sizes > 0
    a_us = st.a_us.at[:, m].add(st.a_us[:, r])  # column: sum over v in C_m of the same terms
    # Row: in_m * out_m does not split into the parts' terms, so it is recomputed from the edges.
    row = _merged_row(idx, w, nl, m, order, start[m], sizes[m], p, member_chunk)
    a_us = a_us.at[m].set(row)
    s = jnp.where(active, sizes, 1).astype(row.dtype)
    # Read after both writes: XLA then updates a_us in place (an earlier read costs a P x P copy).
    new = row / (s[m] * s[m]) + a_us[:, m] / (s * s)
    new = jnp.where(active & (slots != m), new, -jnp.inf)
    aff = st.aff.at[m].set(new).at[:, m].set(new)  # column r goes stale: masked when read

    # Slot i's cache T is its top-K_c; every uncached entry ranks below T's last entry. After the
    # merge the candidates are T without m and r, plus the new A[i, m]. That is the new top-K_c
    # unless an uncached entry could enter: when T was full and lost both m and r, or lost one of
    # them while A[i, m] now ranks below T's old last entry. Only those slots are rebuilt.
    gone = (st.top_i == m) | (st.top_i == r)
    had_m = jnp.any(st.top_i == m, axis=0)
    had_r = jnp.any(st.top_i == r, axis=0)
    last_v, last_i = st.top_v[-1], st.top_i[-1]
    above_last = (new > last_v) | ((new == last_v) & (m <= last_i))
    held = (last_i < p) & ((had_m & had_r) | ((had_m | had_r) & ~above_last))
    others = active & (slots != m)
    held = held & others
    cand_v = jnp.concatenate([jnp.where(gone, -jnp.inf, st.top_v), new[None]])
    cand_i = jnp.concatenate([jnp.where(gone, p, st.top_i), jnp.full((1, p), m, jnp.int32)])
    cand_v, cand_i = _top_of_candidates(cand_v, cand_i, k_c)
    cand_i = jnp.where(cand_v == -jnp.inf, p, cand_i)
    mv, mi = _top(new[None], p, k_c)
    top_v = jnp.where(others, cand_v, st.top_v).at[:, m].set(mv[:, 0]).at[:, r].set(-jnp.inf)
    top_i = jnp.where(others, cand_i, st.top_i).at[:, m].set(mi[:, 0]).at[:, r].set(p)

    def rebuild(c):
      flag, tv, ti = c
      # The first flagged slots (top_k breaks ties by lower index), then unflagged ones: those
      # are recomputed to the same cache (active) or to one that is never read (inactive). Kept
      # this plain on purpose: int or 1-D keys, or gathering flag[rows], turned XLA CPU's TopK
      # kernel into a full sort of P.
      rows = lax.top_k(flag.astype(jnp.float32)[None], row_chunk)[1][0]
      v, t = _top(jnp.where(active[None, :], aff[rows], -jnp.inf), p, k_c)
      return flag.at[rows].set(False), tv.at[:, rows].set(v), ti.at[:, rows].set(t)

    _, top_v, top_i = lax.while_loop(lambda c: jnp.any(c[0]), rebuild, (held, top_v, top_i))
    log = st.log.at[st.step].set(jnp.stack([i, j]))
    return _Loop(st.step + 1, lab, nl, order, start, sizes, fsum, a_us, aff, top_v, top_i, log)

  final = lax.while_loop(lambda st: st.step < num_merges, step, init)
  return final.lab, final.log


def merge_period(
  features: jax.Array,
  idx: jax.Array,
  w: jax.Array,
  labels: np.ndarray | jax.Array,
  num_merges: int,
  *,
  k_c: int,
  lam: float,
  num_slots: int | None = None,
  return_merges: bool = False,
  chunks: tuple[int, int] = CHUNKS,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """Exactly num_merges merges by the JULE criterion, in one jitted loop.

  Per step, with a_1 >= a_2 >= ... the affinities of cluster i to the other active clusters:
  score(i) = a_1 + lam / (K_c - 1) * sum_{k=2..K_c} (a_1 - a_k); with fewer than K_c other
  clusters the sum runs over those there are (divisor still K_c - 1; K_c = 1: score = a_1). The
  best-scoring cluster merges with its most affine one. When every affinity among active clusters
  is 0, the pair with the closest centroids (mean features) merges instead.

  Args:
    features: (n, d) features (used by the centroid fallback).
    idx: (n, K_s) kNN indices.
    w: (n, K_s) edge weights.
    labels: (n,) int labels 0..Nc-1, every label used.
    num_merges: merges to perform, 0 <= num_merges <= Nc - 1.
    k_c: K_c, affinities compared in the criterion (>= 1).
    lam: lambda, weight of the affinity-gap term.
    num_slots: padded cluster count (default: slot_bucket(Nc, k_c)); results do not depend on it.
    return_merges: also return the merged pairs.
    chunks: (members, cache rows) handled per pass of the loop's inner loops: speed only, the
      result does not depend on them.

  Returns:
    (n,) int32 labels 0..Nc-num_merges-1 in order of first appearance; with return_merges also
    (num_merges, 2) int32: per step the best-scoring cluster and its partner, as input labels (a
    merged cluster keeps the lower label of its pair).
  """
  x = graph.check_features(features, 'merge_period')
  lab = np.asarray(labels)
  n = x.shape[0]
  if lab.shape != (n,) or not np.issubdtype(lab.dtype, np.integer):
    raise ValueError(f'merge_period: labels {lab.shape} {lab.dtype}; expected ({n},) integers.')
  nc = int(lab.max()) + 1 if n else 0
  if lab.min() < 0 or len(np.unique(lab)) != nc:
    raise ValueError('merge_period: labels must use every value 0..Nc-1 (see graph.renumber()).')
  if not 0 <= num_merges <= nc - 1:
    raise ValueError(
      f'merge_period: num_merges = {num_merges} for {nc} clusters; expected 0..{nc - 1}.'
    )
  if int(k_c) < 1:
    raise ValueError(f'cluster.k_c = {k_c}: expected an integer >= 1.')
  p = slot_bucket(nc, k_c) if num_slots is None else int(num_slots)
  if p < max(nc, int(k_c) + 1):
    raise ValueError(f'merge_period: num_slots = {p}; expected >= {max(nc, int(k_c) + 1)}.')
  if not (chunks[0] >= 1 and 1 <= chunks[1] <= p):
    raise ValueError(f'merge_period: chunks = {chunks}; expected (>= 1, 1..{p}).')
  out, log = _merge_loop(
    x,
    jnp.asarray(idx, jnp.int32),
    jnp.asarray(w, jnp.float32),
    jnp.asarray(lab, jnp.int32),
    jnp.int32(num_merges),
    jnp.float32(lam),
    num_slots=p,
    k_c=int(k_c),
    chunks=(int(chunks[0]), int(chunks[1])),
  )
  new = graph.renumber(np.asarray(out))
  return (new, np.asarray(log)[:num_merges]) if return_merges else new


def merges_in_period(num_clusters: int, num_target: int, unfolding_rate: float) -> int:
  """Merges of one period: min(ceil(eta * Nc), Nc - C), and 0 once Nc <= C.

  Args:
    num_clusters: Nc at the period's start.
    num_target: C.
    unfolding_rate: eta.

  Returns:
    The merge count.
  """
  # Rounded first so that a float product like 0.7 * 10 = 7.000000000000001 does not ceil to 8.
  return max(0, min(math.ceil(round(unfolding_rate * num_clusters, 9)), num_clusters - num_target))


def _check_cluster_args(num_target, k_s, k_c, a, lam, unfolding_rate):
  for name, value, ok, expected in (
    (
      'num_clusters',
      num_target,
      isinstance(num_target, (int, np.integer)) and num_target >= 1,
      'an integer >= 1',
    ),
    ('k_s', k_s, isinstance(k_s, (int, np.integer)) and k_s >= 1, 'an integer >= 1'),
    ('k_c', k_c, isinstance(k_c, (int, np.integer)) and k_c >= 1, 'an integer >= 1'),
    ('a', a, math.isfinite(a) and a > 0, 'a finite number > 0'),
    ('lam', lam, math.isfinite(lam) and lam >= 0, 'a finite number >= 0'),
    ('unfolding_rate', unfolding_rate, 0 < unfolding_rate <= 1, 'a number in (0, 1]'),
  ):
    if not ok:
      raise ValueError(f'cluster_period: {name} = {value!r}; expected {expected}.')


def _graph(features, k_s: int, a: float):
  x = graph.check_features(features, 'clustering')
  if k_s > x.shape[0] - 1:
    raise ValueError(
      f'cluster_period: k_s = {k_s}; expected at most n - 1 = {x.shape[0] - 1} (one fewer than the '
      'number of samples).'
    )
  idx, d2 = graph.knn_graph(x, k_s)
  w, _ = graph.knn_weights(d2, a)
  return x, idx, w


def cluster_period(
  features: np.ndarray | jax.Array,
  labels: np.ndarray | jax.Array | None,
  num_target: int,
  k_s: int,
  k_c: int,
  a: float,
  lam: float,
  unfolding_rate: float,
  with_start: bool = False,
) -> np.ndarray | tuple[np.ndarray, int]:
  """One JULE forward period: fresh kNN graph and affinities, then the period's merges.

  Args:
    features: (n, d) L2-normalised features (numpy or jax).
    labels: (n,) current integer labels, or None to start from the 1-NN components.
    num_target: C, the final cluster count.
    k_s: K_s, kNN size.
    k_c: K_c of the merge criterion.
    a: sigma^2 = a * mean kNN squared distance.
    lam: lambda of the merge criterion.
    unfolding_rate: eta; the period merges min(ceil(eta * Nc), Nc - C) times.
    with_start: also return Nc, the cluster count before the merges (the 1-NN component count
      when labels is None).

  Returns:
    (n,) int32 labels 0..Nc'-1 in order of first appearance; with with_start, (labels, Nc).

  Raises:
    graph.DegenerateFeatures: features that leave nothing to cluster (before any merge).
    ValueError: arguments out of range or inconsistent with the features (the caller's; the config
      values are checked in jule3d/checks.py).
  """
  _check_cluster_args(num_target, k_s, k_c, a, lam, unfolding_rate)
  x, idx, w = _graph(features, k_s, a)
  if labels is None:
    labels = graph.initial_clusters(idx)
  else:
    labels = np.asarray(labels)
    if labels.shape != (x.shape[0],):
      raise ValueError(f'cluster_period: labels {labels.shape}; expected ({x.shape[0]},).')
    labels = graph.renumber(labels)
  start = int(labels.max()) + 1
  num_merges = merges_in_period(start, num_target, unfolding_rate)
  if num_merges:
    labels = merge_period(x, idx, w, labels, num_merges, k_c=k_c, lam=lam)
  return (labels, start) if with_start else labels


def agglomerate(
  features: np.ndarray | jax.Array,
  num_target: int,
  *,
  k_s: int,
  k_c: int,
  a: float,
  lam: float,
  labels: np.ndarray | jax.Array | None = None,
) -> np.ndarray:
  """Merges straight down to num_target clusters on fixed features (one long period).

  Affinities after a merge are exact, so this equals repeated periods on the same features (up
  to float32 rounding on near-ties).

  Args:
    features: (n, d) L2-normalised features.
    num_target: final cluster count C.
    k_s: K_s, kNN size.
    k_c: K_c of the merge criterion.
    a: sigma^2 = a * mean kNN squared distance.
    lam: lambda of the merge criterion.
    labels: start partition (default: the 1-NN components).

  Returns:
    (n,) int32 labels 0..C'-1 in order of first appearance, C' = min(C, start clusters).
  """
  return cluster_period(features, labels, num_target, k_s, k_c, a, lam, unfolding_rate=1.0)
