"""What k-means reads in a run's learned features: their shape against the centre intensity.

Reads the grid features a run saved (`--config.segment.save_features=True`, WORKDIR/features.npz)
and the reference labels, on 100,000 random annotated grid patches, and prints:

  - the share of the features' variance along their first principal axes;
  - how the first axis follows the centre voxel's intensity: Pearson correlation with the
    intensity and with its rank (its empirical CDF): a triplet embedding trained on C equal-sized
    clusters of the intensity spaces them evenly, i.e. follows the rank;
  - k-means (K = 3) on the features (as the pipeline runs it) and on the intensity: NMI and the groups' shares, beside the
    reference classes' shares (k-means on a rank-like axis cuts it into near-equal thirds);
  - a linear probe (logistic regression trained on half the patches, scored on the other half):
    how much of the reference the features hold at all, against the intensity's;
  - the best grouping of C clusters (C = cluster.num_clusters, k-means on the features, as many
    as JULE's final clusters): each cluster given its most frequent reference class. No reading
    that groups the learned clusters into segments can score more; beside it the same for C
    k-means clusters of the intensity (about the best thresholds of it);
  - one reading that groups them without labels, by where they lie: a normalised cut (spectral
    clustering, K groups) of the C clusters' contact graph (how often two clusters are
    6-neighbours on the grid), clusters that interleave in space being one segment.

  python launch.py --config=configs/mni152.py --workdir=runs/mni152 --config.segment.save_features=True
  python bench/embedding_reading.py --data=mni152 --workdir=runs/mni152

The features are those k-means read: the recommended method (segment.layer = 'auto') reads MNI152's
hidden layer; add --config.segment.layer=embedding to the first command for the embedding.
"""

import argparse
import os
import sys

import numpy as np
from sklearn.cluster import KMeans, SpectralClustering
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import demo, mni152  # noqa: E402
from jule3d import descriptors, groups, pipeline  # noqa: E402
from jule3d.train import patch_nmi  # noqa: E402
from jule3d.workdir import FEATURES  # noqa: E402

SAMPLE = 100_000


def _shares(labels: np.ndarray) -> str:
  counts = np.bincount(labels)
  return ' / '.join(f'{v:.2f}' for v in counts[counts > 0] / len(labels))


def best_grouping(truth: np.ndarray, z: np.ndarray, clusters: int) -> float:
  """NMI of `clusters` k-means clusters of z, each labelled with its most frequent true class."""
  km = KMeans(clusters, n_init=3, random_state=0).fit_predict(z)
  table = np.zeros((clusters, truth.max() + 1), np.int64)
  np.add.at(table, (km, truth), 1)
  return patch_nmi(truth, table.argmax(1)[km])


def contact_grouping(centres: np.ndarray, z: np.ndarray, clusters: int, k: int) -> np.ndarray:
  """Every grid patch's group: C k-means clusters of z, cut into k by their grid contacts."""
  rng = np.random.default_rng(0)
  fit = z[rng.choice(len(z), min(len(z), 200_000), replace=False)]
  km = KMeans(clusters, n_init=3, random_state=0).fit(fit).predict(z)
  step = [np.diff(np.unique(col)).min(initial=1) for col in centres.T]  # the grid's stride
  at = (centres - centres.min(0)) // np.asarray(step)
  grid = np.full(at.max(0) + 1, -1, np.int64)
  grid[tuple(at.T)] = km
  contacts = np.zeros((clusters, clusters))
  for axis in range(3):
    g = np.moveaxis(grid, axis, 0)
    p, q = g[:-1].ravel(), g[1:].ravel()
    both = (p >= 0) & (q >= 0)
    np.add.at(contacts, (p[both], q[both]), 1)
    np.add.at(contacts, (q[both], p[both]), 1)
  cut = SpectralClustering(k, affinity='precomputed', assign_labels='cluster_qr', random_state=0)
  return cut.fit_predict(contacts)[km]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--data', choices=('demo', 'mni152'), default='mni152')
  p.add_argument('--workdir', required=True, help='a run of that config with saved features')
  a = p.parse_args(argv)
  path = os.path.join(a.workdir, FEATURES)
  if not os.path.exists(path):
    raise SystemExit(f'{path} not found: run with --config.segment.save_features=True first')
  cfg = {'demo': demo, 'mni152': mni152}[a.data].get_config()
  inputs = pipeline.resolve_inputs(cfg, a.workdir)
  saved = np.load(path)
  centres, feats = saved['centres'], saved['features']
  where = tuple(centres.T)
  truth = np.asarray(inputs.labels.store.read().result())[where]
  level = np.asarray(inputs.image.store.read().result())[where].astype(np.float64)
  annotated = np.flatnonzero(truth > 0)
  pick = np.sort(np.random.default_rng(0).choice(annotated, min(SAMPLE, annotated.size), False))
  t, f, x = truth[pick], feats[pick].astype(np.float64), level[pick]

  centred = f - f.mean(0)
  u, s, _ = np.linalg.svd(centred, full_matrices=False)
  share = s**2 / (s**2).sum()
  pc1 = u[:, 0] * s[0]
  rank = np.argsort(np.argsort(x, kind='stable'), kind='stable') / len(x)
  print(f'{len(pick)} annotated grid patches of {a.workdir}')
  print(f'variance along the first principal axes: {" / ".join(f"{v:.3f}" for v in share[:4])}')
  print(
    f'first axis vs the centre intensity: |corr| {abs(np.corrcoef(pc1, x)[0, 1]):.3f}, '
    f'vs its rank {abs(np.corrcoef(pc1, rank)[0, 1]):.3f}'
  )
  km_f = groups.kmeans_labels(f.astype(np.float32), 3, 0, 5, SAMPLE)[
    0
  ]  # as the pipeline reads them
  km_x = KMeans(3, n_init=5, random_state=0).fit(x[:, None]).labels_
  print(f'reference classes: shares {_shares(t)}')
  print(f'k-means on the features: NMI {patch_nmi(t, km_f):.3f}, shares {_shares(km_f)}')
  print(f'k-means on the intensity: NMI {patch_nmi(t, km_x):.3f}, shares {_shares(km_x)}')
  half = len(pick) // 2
  for name, z in (('features', descriptors.standardise(f)), ('intensity', x[:, None])):
    probe = LogisticRegression(max_iter=2000).fit(z[:half], t[:half])
    print(f'linear probe on the {name}: NMI {patch_nmi(t[half:], probe.predict(z[half:])):.3f}')
  c = cfg.cluster.num_clusters
  for name, z in (('features', f), ('intensity', x[:, None])):
    print(f'best grouping of {c} k-means clusters of the {name}: NMI {best_grouping(t, z, c):.3f}')
  every = np.flatnonzero(truth > 0)
  for name, z in (('features', feats.astype(np.float64)), ('intensity', level[:, None])):
    cut = contact_grouping(centres, z, c, 3)[every]
    print(
      f'{c} k-means clusters of the {name} cut into 3 by their grid contacts: '
      f'NMI {patch_nmi(truth[every], cut):.3f}, shares {_shares(cut)}'
    )
  return 0


if __name__ == '__main__':
  sys.exit(main())
