"""k-means of learned features, and whether they hold K groups at all (no labels needed).

The segments are k-means' K clusters of the grid features (jule3d/segment.py). k-means returns K
clusters of anything, also of a continuum or of fewer groups; `structure` tells the two apart from
the features alone, so a run can say (and, in training, act on: train.tries) whether its K segments
are K groups of the features or cuts through fewer.
"""

import numpy as np
from absl import logging
from sklearn.cluster import KMeans


def kmeans_labels(
  features: np.ndarray,
  k: int,
  seed: int,
  restarts: int,
  max_fit: int,
) -> tuple[np.ndarray, np.ndarray]:
  """k-means (k-means++, several restarts) on at most max_fit seeded samples; predicts all in chunks.

  Args:
    features: [M, D].
    k: clusters K.
    seed: seed.
    restarts: n_init.
    max_fit: subsample size for fitting.

  Returns:
    ([M] uint8 labels in 1..K, [M, K] float32 squared distances to every centroid).
  """
  rng = np.random.default_rng([seed, 2])
  fit = (
    features
    if len(features) <= max_fit
    else features[np.sort(rng.choice(len(features), max_fit, replace=False))]
  )
  km = KMeans(n_clusters=k, n_init=restarts, random_state=seed).fit(fit)
  out = np.empty(len(features), np.uint8)
  dist = np.empty((len(features), k), np.float32)
  for i in range(0, len(features), 65536):
    d = km.transform(features[i : i + 65536])
    out[i : i + 65536] = np.argmin(d, axis=1) + 1
    dist[i : i + 65536] = np.square(d)
  return out, dist


# structure: a ratio W(K) / W(K - 1) above this share of the continuum's ((K - 1) / K)^2 says
# the features hold fewer than K distinct groups (README "Honest reading": 0.21-0.27 in the phantom
# runs that separate its three regions, 0.51-0.52 in those that merge two of them, 0.41-0.47 on
# MNI152). On the period-0 features (train.tries acts on both): the phantom's cue 0.28-0.31, close
# to the 0.33 line, MNI152's 0.48-0.50, 'texture' and L2 raw voxels 0.68-0.98 (seeds 0-5).
_DISTINCT_SHARE = 0.75


def structure(features: np.ndarray, dist: np.ndarray, seed: int, restarts: int, max_fit: int):
  """Whether k-means' K segments are K groups of the features or cuts through fewer (no labels).

  W(k) is the variance k-means with k clusters leaves, as a share of the features' total. When the
  features hold K distinct groups, the K-th cluster removes most of what K - 1 leave: W(K) / W(K - 1)
  is small. Where they form one continuum (a segment boundary cuts through it) or hold fewer groups
  (a cluster splits one of them), the ratio is near what a uniform 1-D continuum gives,
  ((K - 1) / K)^2 (0.44 for K = 3).

  Args:
    features: [M, D] the grid features k-means segmented.
    dist: [M, K] their squared distances to the K centroids (kmeans_labels).
    seed: k-means seed (as for the segments).
    restarts: n_init.
    max_fit: fit sample size.

  Returns:
    {'k', 'unexplained_k', 'unexplained_k_minus_1', 'ratio', 'continuum_ratio', 'distinct'}.
  """
  k = dist.shape[1]
  mean = np.zeros(features.shape[1])
  for i in range(0, len(features), 65536):
    mean += features[i : i + 65536].sum(axis=0, dtype=np.float64)
  mean /= len(features)
  total = sum(
    float(np.square(features[i : i + 65536] - mean).sum()) for i in range(0, len(features), 65536)
  )

  def left(d: np.ndarray) -> float:  # what k-means leaves: each feature's distance to its centroid
    return float(d.min(axis=1).sum(dtype=np.float64))

  w_k = left(dist)
  w_k1 = total if k == 2 else left(kmeans_labels(features, k - 1, seed, restarts, max_fit)[1])
  ratio = w_k / w_k1 if w_k1 > 0 else 1.0
  continuum = ((k - 1) / k) ** 2
  return {
    'k': k,
    'unexplained_k': round(w_k / total, 4) if total > 0 else 0.0,
    'unexplained_k_minus_1': round(w_k1 / total, 4) if total > 0 else 0.0,
    'ratio': round(ratio, 4),
    'continuum_ratio': round(continuum, 4),
    'distinct': bool(ratio < _DISTINCT_SHARE * continuum),
  }


def verdict(groups: dict, advice: bool = True) -> str:
  """structure's finding in words (the log line and report.md); `advice`: what segments cut from
  such features do, and what to try."""
  k = groups['k']
  if groups['distinct']:
    return f'the features hold {k} distinct groups'
  found = f'the features hold fewer than {k} distinct groups'
  if not advice:
    return found
  return (
    f'{found}: segments cut through one (or merge two); check the slices; where the '
    "period-0 features held them (train_history.json 'groups_start'), another --config.seed may "
    'separate them'
  )


def log_structure(found: dict, what: str, advice: bool = True) -> None:
  """One log line for `structure`'s result on `what` (with `advice`, a warning when the groups are
  not distinct)."""
  k = found['k']
  logging.log(
    logging.INFO if found['distinct'] or not advice else logging.WARNING,
    '%s: k-means leaves %.3f of the variance with K = %d, %.3f with %d: ratio %.2f (one continuum '
    'gives %.2f): %s',
    what,
    found['unexplained_k'],
    k,
    found['unexplained_k_minus_1'],
    k - 1,
    found['ratio'],
    found['continuum_ratio'],
    verdict(found, advice),
  )
