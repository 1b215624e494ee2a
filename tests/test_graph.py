"""kNN graph, GDL affinities and the merge loop against plain numpy references (method §3)."""

import math

import numpy as np
import pytest
import scipy.sparse
from scipy.sparse.csgraph import connected_components

from jule3d import graph, merge
from jule3d.errors import UserError

N, D, K_S, SLOTS = 120, 6, 8, 64  # one compiled shape for most merge tests


def _features(seed, n=N, d=D, duplicates=True):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(6, d))
  x = centres[rng.integers(0, 6, n)] + rng.uniform(0.2, 0.8) * rng.normal(size=(n, d))
  if duplicates:
    x[n // 2 : n // 2 + 4] = x[3]  # exact duplicates of sample 3 (ties at distance 0)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x.astype(np.float32)


def _pairwise(x):
  x = x.astype(np.float64)
  d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
  np.fill_diagonal(d, np.inf)
  return d


def _dense_w(idx, w, n):
  big_w = np.zeros((n, n))
  big_w[np.arange(n)[:, None], np.asarray(idx)] = np.asarray(w, np.float64)
  return big_w


def _same_partition(p, q):
  p, q = np.asarray(p), np.asarray(q)
  return np.array_equal(p[:, None] == p[None, :], q[:, None] == q[None, :])


def _first_appearance_order(lab):
  firsts = [int(np.argmax(lab == c)) for c in range(lab.max() + 1)]
  return lab.dtype == np.int32 and lab.min() == 0 and firsts == sorted(firsts)


# --- kNN graph and weights ------------------------------------------------------------------


@pytest.mark.parametrize('seed,block', [(0, 32), (1, 1024)])
def test_knn_graph_matches_brute_force_with_duplicates(seed, block):
  x = _features(seed)
  k = 7
  idx, d2 = graph.knn_graph(x, k, block_size=block)
  idx, d2 = np.asarray(idx), np.asarray(d2)
  assert idx.shape == (N, k) and idx.dtype == np.int32 and d2.dtype == np.float32
  ref = _pairwise(x)
  rows = np.arange(N)[:, None]
  assert (idx != rows).all()
  assert all(len(set(r)) == k for r in idx)
  np.testing.assert_allclose(d2, ref[rows, idx], atol=1e-6)
  np.testing.assert_allclose(d2, np.sort(ref, axis=1)[:, :k], atol=1e-6)
  order = np.argsort(ref, axis=1, kind='stable')
  srt = np.sort(ref, axis=1)
  clear = srt[:, k] - srt[:, k - 1] > 1e-4  # rows whose k-th neighbour is not a near-tie
  assert clear.sum() > N // 2
  for i in np.flatnonzero(clear):
    assert set(idx[i]) == set(order[i, :k])
  dup = [3, *range(N // 2, N // 2 + 4)]
  for i in dup:  # the other copies are at distance exactly 0; self is not among them
    assert set(idx[i, :4]) == set(dup) - {i} and (d2[i, :4] == 0).all()


def test_knn_weights_sigma_and_guards():
  x = _features(2)
  idx, d2 = graph.knn_graph(x, K_S)
  ref = np.sort(_pairwise(x), axis=1)[:, :K_S]
  w, sigma2 = graph.knn_weights(d2, 0.5)
  assert sigma2 == pytest.approx(0.5 * ref.mean(), rel=1e-5)
  np.testing.assert_allclose(np.asarray(w), np.exp(-ref / (0.5 * ref.mean())), rtol=1e-5)
  same = np.ones((20, 4), np.float32)
  _, d2_same = graph.knn_graph(same, 3)
  # Features that leave nothing to cluster are their own ValueError (train.py words it for the
  # user); a k out of range is the caller's bug. Neither is a UserError in the library.
  with pytest.raises(graph.DegenerateFeatures, match='sigma'):
    graph.knn_weights(d2_same, 1.0)
  with pytest.raises(graph.DegenerateFeatures, match='sigma'):
    graph.knn_weights(d2, 0.0)
  with pytest.raises(ValueError, match='k = 120') as info:
    graph.knn_graph(x, N)
  assert not isinstance(info.value, (UserError, graph.DegenerateFeatures))
  with pytest.raises(graph.DegenerateFeatures, match='identical') as info:
    merge.cluster_period(same, None, 2, k_s=3, k_c=5, a=1.0, lam=1.0, unfolding_rate=0.9)
  assert not isinstance(info.value, UserError)


# --- initial clusters -----------------------------------------------------------------------


def _weak_components(nn1):
  n = len(nn1)
  adj = scipy.sparse.coo_matrix((np.ones(n), (np.arange(n), nn1)), shape=(n, n))
  return connected_components(adj, directed=True, connection='weak')[1]


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_initial_clusters_are_weak_components_of_1nn_graph(seed):
  x = _features(seed)
  idx, _ = graph.knn_graph(x, 3)
  lab = graph.initial_clusters(idx)
  assert _same_partition(lab, _weak_components(np.asarray(idx)[:, 0]))
  assert _first_appearance_order(lab)
  # Arbitrary pointer graphs: long cycles and self-loops, not just mutual-nearest-neighbour pairs.
  rng = np.random.default_rng(seed)
  nn1 = rng.integers(0, 37, 37)
  lab = graph.initial_clusters(nn1[:, None])
  assert _same_partition(lab, _weak_components(nn1)) and _first_appearance_order(lab)


# --- GDL affinity ---------------------------------------------------------------------------


def _literal_gdl(big_w, lab):
  nc = lab.max() + 1
  members = [np.flatnonzero(lab == c) for c in range(nc)]
  a_us = np.zeros((nc, nc))
  for i, ci in enumerate(members):
    for j, cj in enumerate(members):
      a_us[i, j] = (big_w[np.ix_(ci, cj)] @ big_w[np.ix_(cj, ci)]).sum()
  sizes = np.array([len(c) for c in members], np.float64)
  aff = a_us / sizes[:, None] ** 2 + (a_us / sizes[:, None] ** 2).T
  np.fill_diagonal(aff, 0.0)
  return aff, a_us


def _degree_gdl(big_w, slots):
  # Same quantity through in/out degrees: rows/cols follow the `slots` dict's member lists.
  keys = sorted(slots)
  z = np.zeros((big_w.shape[0], len(keys)))
  for c, s in enumerate(keys):
    z[slots[s], c] = 1.0
  a_us = ((z.T @ big_w) * (z.T @ big_w.T)) @ z
  sizes = z.sum(0)
  aff = a_us / sizes[:, None] ** 2 + (a_us / sizes[:, None] ** 2).T
  np.fill_diagonal(aff, 0.0)
  return aff, keys


@pytest.mark.parametrize('seed', [0, 3])
def test_gdl_affinity_matches_dense_formula(seed):
  x = _features(seed)
  idx, d2 = graph.knn_graph(x, K_S)
  w, _ = graph.knn_weights(d2, 1.0)
  big_w = _dense_w(idx, w, N)
  rng = np.random.default_rng(seed)
  lab = rng.integers(0, 25, N)
  lab = np.unique(lab, return_inverse=True)[1]  # 0..Nc-1, varied sizes
  nc = lab.max() + 1
  aff, a_us = graph.gdl_affinity(idx, w, lab, SLOTS)
  ref_aff, ref_us = _literal_gdl(big_w, lab)
  assert (ref_aff > 0).sum() > nc  # a real test: many connected pairs
  np.testing.assert_allclose(np.asarray(a_us)[:nc, :nc], ref_us, atol=1e-5)
  np.testing.assert_allclose(np.asarray(aff)[:nc, :nc], ref_aff, atol=1e-5)
  assert not np.asarray(aff)[nc:].any() and not np.asarray(aff)[:, nc:].any()
  slots = {c: np.flatnonzero(lab == c) for c in range(nc)}
  np.testing.assert_allclose(_degree_gdl(big_w, slots)[0], ref_aff, atol=1e-12)


# --- merge loop -----------------------------------------------------------------------------


def _reference_merges(x, idx, w, lab, num_merges, k_c, lam):
  """Recomputes every affinity from scratch before each merge (float64, dense W)."""
  big_w = _dense_w(idx, w, len(lab))
  slots = {c: np.flatnonzero(lab == c) for c in range(lab.max() + 1)}
  merges, fallbacks = [], 0
  for _ in range(num_merges):
    aff, keys = _degree_gdl(big_w, slots)
    if aff.max() <= 0:
      fallbacks += 1
      mu = np.stack([x[slots[s]].astype(np.float64).mean(0) for s in keys])
      dist = {
        (a, b): ((mu[a] - mu[b]) ** 2).sum()
        for a in range(len(keys))
        for b in range(a + 1, len(keys))
      }
      a, b = min(dist, key=lambda p: (dist[p], p))
      i, j = keys[a], keys[b]
    else:
      best = None
      for a, s in enumerate(keys):
        others = sorted((-aff[a, b], keys[b]) for b in range(len(keys)) if b != a)
        vals = [-v for v, _ in others[:k_c]]
        score = vals[0] + (lam / (k_c - 1) * sum(vals[0] - v for v in vals[1:]) if k_c > 1 else 0)
        if best is None or score > best[0]:
          best = (score, s, others[0][1])
      i, j = best[1], best[2]
    merges.append((frozenset(slots[i]), frozenset(slots[j])))
    m, r = min(i, j), max(i, j)
    slots[m] = np.concatenate([slots[m], slots.pop(r)])
  final = np.empty(len(lab), np.int64)
  for s, members in slots.items():
    final[members] = s
  return merges, final, fallbacks


def _log_as_sets(lab, log):
  slots = {c: np.flatnonzero(lab == c) for c in range(lab.max() + 1)}
  out = []
  for i, j in log:
    out.append((frozenset(slots[i]), frozenset(slots[j])))
    m, r = min(i, j), max(i, j)
    slots[m] = np.concatenate([slots[m], slots.pop(r)])
  return out


def _problem(seed, k_s=K_S, n=N, x=None):
  x = _features(seed, n=n) if x is None else x
  idx, d2 = graph.knn_graph(x, k_s)
  w, _ = graph.knn_weights(d2, 1.0)
  return x, idx, w, graph.initial_clusters(idx)


@pytest.mark.parametrize('seed,k_c,lam,target', [(0, 5, 1.0, 3), (1, 5, 1.0, 1), (2, 3, 0.5, 6)])
def test_merge_sequence_matches_reference(seed, k_c, lam, target):
  x, idx, w, lab = _problem(seed)
  num = lab.max() + 1 - target
  new, log = merge.merge_period(
    x, idx, w, lab, num, k_c=k_c, lam=lam, num_slots=SLOTS, return_merges=True
  )
  ref, ref_final, _ = _reference_merges(x, idx, w, lab, num, k_c, lam)
  assert _log_as_sets(lab, log) == ref
  assert _same_partition(new, ref_final)
  assert new.max() + 1 == target and _first_appearance_order(new)


def test_merge_result_does_not_depend_on_padding_or_chunks():
  x, idx, w, lab = _problem(4)
  num = lab.max()  # down to one cluster: members span many chunks, caches empty out
  kw = dict(k_c=5, lam=1.0, return_merges=True)
  a = merge.merge_period(x, idx, w, lab, num, **kw)
  b = merge.merge_period(x, idx, w, lab, num, num_slots=SLOTS, chunks=(3, 1), **kw)
  assert merge.slot_bucket(lab.max() + 1, 5) < SLOTS
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert _log_as_sets(lab, b[1]) == _reference_merges(x, idx, w, lab, num, 5, 1.0)[0]


def test_disconnected_graph_uses_centroid_fallback():
  rng = np.random.default_rng(5)
  n = 80
  x = 0.05 * rng.normal(size=(n, D))
  x[: n // 2, 0] += 1.0  # two far-apart blobs, three tight groups in the second
  x[n // 2 :, 1] += 1.0
  x[n // 2 : n // 2 + 12, 2] += 0.4
  x[n // 2 + 12 : n // 2 + 24, 3] += 0.4
  x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  x, idx, w, lab = _problem(0, k_s=3, n=n, x=x)
  num = lab.max()  # down to one cluster
  new, log = merge.merge_period(x, idx, w, lab, num, k_c=5, lam=1.0, return_merges=True)
  ref, ref_final, fallbacks = _reference_merges(x, idx, w, lab, num, 5, 1.0)
  assert fallbacks >= 2  # the path under test is taken, more than once
  assert _log_as_sets(lab, log) == ref
  assert (new == 0).all()


# --- periods --------------------------------------------------------------------------------


def test_merges_per_period():
  assert merge.merges_in_period(38, 5, 0.9) == 33  # ceil(34.2) = 35 > 38 - 5
  assert merge.merges_in_period(38, 1, 0.9) == 35
  assert merge.merges_in_period(10, 1, 0.7) == 7  # 0.7 * 10 is 7.000000000000001 in floats
  assert merge.merges_in_period(5, 5, 0.9) == 0
  x, idx, w, lab = _problem(6)
  nc = lab.max() + 1
  out = merge.cluster_period(x, None, 3, k_s=K_S, k_c=5, a=1.0, lam=1.0, unfolding_rate=0.5)
  assert out.max() + 1 == nc - math.ceil(0.5 * nc) and _first_appearance_order(out)
  direct = merge.merge_period(x, idx, w, lab, math.ceil(0.5 * nc), k_c=5, lam=1.0)
  np.testing.assert_array_equal(out, direct)


def test_agglomerate_reaches_target_and_equals_repeated_periods():
  x = _features(7)
  kw = dict(k_s=K_S, k_c=5, a=1.0, lam=1.0)
  final = merge.agglomerate(x, 4, **kw)
  assert final.max() + 1 == 4 and _first_appearance_order(final)
  labels = None
  for _ in range(20):
    labels = merge.cluster_period(x, labels, 4, unfolding_rate=0.5, **kw)
    if labels.max() + 1 == 4:
      break
  # Periods rebuild the affinities from scratch; the long period updates them after each merge.
  np.testing.assert_array_equal(labels, final)


def test_inconsistent_arguments_are_a_bug_not_bad_input():
  # A caller passing labels or a merge count that do not fit is a programming error: an ordinary
  # ValueError (a traceback), never the one-line UserError reserved for the user's input.
  x, idx, w, lab = _problem(0)
  with pytest.raises(ValueError, match='num_merges') as info:
    merge.merge_period(x, idx, w, lab, lab.max() + 1, k_c=5, lam=1.0)
  assert not isinstance(info.value, UserError)
  with pytest.raises(ValueError, match='every value') as info:
    merge.merge_period(x, idx, w, lab + 1, 1, k_c=5, lam=1.0)
  assert not isinstance(info.value, UserError)


def test_arguments_out_of_range_are_the_callers_error():
  # config.cluster's limits are checked in jule3d/checks.py before any run (tests/test_configs.py,
  # tests/test_bad_inputs.py); the library says which argument, as an ordinary ValueError.
  x, _, _, _ = _problem(0)
  with pytest.raises(ValueError, match='k_s') as info:
    merge.cluster_period(x, None, 3, k_s=N, k_c=5, a=1.0, lam=1.0, unfolding_rate=0.9)
  assert not isinstance(info.value, UserError)
  with pytest.raises(ValueError, match='unfolding_rate') as info:
    merge.cluster_period(x, None, 3, k_s=K_S, k_c=5, a=1.0, lam=1.0, unfolding_rate=0.0)
  assert not isinstance(info.value, UserError)
