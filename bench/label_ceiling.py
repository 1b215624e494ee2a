"""How far the CNN's embedding can carry the tissues: train it on given labels, read it with k-means.

Trains the config's CNN (triplet loss, the project's train step) on the labels of `--patches`
random annotated domain patches, then runs k-means (K = 3) on the embeddings of 20,000 other
annotated grid patches and prints the NMI against the reference. The labels:

  true     the reference itself: the ceiling of "triplet embedding + k-means" for this network
  cueC     k-means with C groups of the period-0 cue the rule picks (descriptors.pick_cue)
  cellsC   k-means with C groups of the patch centres' coordinates: spatial cells, no image content

`--rounds R` re-clusters the trained embeddings of the training patches (k-means, C = 20) and
trains again, R - 1 times (self-training). The cue's own k-means score on the probe patches is
printed first. Nothing is written. Examples (README "Honest reading"):

  python bench/label_ceiling.py --data=demo --labels=true --head=mean
  python bench/label_ceiling.py --data=demo --labels=cue3 --head=mean --centre=1 --rounds=3
  python bench/label_ceiling.py --data=mni152 --labels=true --centre=1 --patches=4000 --epochs=16
"""

import argparse
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.cluster import KMeans

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import demo, mni152  # noqa: E402
from jule3d import descriptors, grid, model, objective, patches, pipeline  # noqa: E402
from jule3d.train import patch_nmi  # noqa: E402

PROBE = 20_000


def _kmeans(f: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
  return KMeans(k, n_init=5, random_state=seed).fit(descriptors.standardise(f)).labels_


def _cue(x: np.ndarray) -> np.ndarray:
  """The period-0 cue the rule picks, [N, 1], of normalised patches."""
  both = np.asarray(descriptors.cue_raw(jnp.asarray(x)))
  return both[:, [descriptors.pick_cue(both, 3)[0]]]


def _labels(kind: str, x: np.ndarray, centres: np.ndarray, truth: np.ndarray) -> np.ndarray:
  if kind == 'true':
    return truth
  if kind.startswith('cue'):
    return _kmeans(_cue(x), int(kind[3:]))
  if kind.startswith('cells'):
    return _kmeans(centres.astype(np.float64), int(kind[5:]))
  raise SystemExit(f'unknown --labels {kind!r}: true, cueC or cellsC')


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--data', choices=('demo', 'mni152'), default='demo')
  p.add_argument('--labels', default='true')
  p.add_argument('--head', choices=('flatten', 'mean'), default='flatten')
  p.add_argument('--centre', type=int, default=0, help='model.centre_size')
  p.add_argument('--patches', type=int, default=2000)
  p.add_argument('--epochs', type=int, default=6)
  p.add_argument('--rounds', type=int, default=1)
  p.add_argument('--workdir', default=os.path.join(tempfile.gettempdir(), 'jule3d-label-ceiling'))
  a = p.parse_args(argv)
  cfg = {'demo': demo, 'mni152': mni152}[a.data].get_config()
  cfg.model.head, cfg.model.centre_size = a.head, a.centre
  inputs = pipeline.resolve_inputs(cfg, os.path.join(a.workdir, a.data))
  w = cfg.patches.patch_size
  centres = grid.centres(
    inputs.image, w, 1, cfg.data.threshold, cfg.data.foreground, interior=inputs.interior
  )
  truth = np.asarray(inputs.labels.store.read().result())[tuple(centres.T)]
  annotated = np.flatnonzero(truth > 0)
  probe = np.sort(np.random.default_rng(0).choice(annotated, PROBE, replace=False))
  train = np.sort(np.random.default_rng(1).choice(annotated, a.patches, replace=False))
  raw_train = patches.read_patches(inputs.patch_source, centres[train], w)
  mean, std = patches.patch_stats(raw_train)
  xt = np.asarray(patches.normalise(raw_train, mean, std))
  xp = np.asarray(
    patches.normalise(patches.read_patches(inputs.patch_source, centres[probe], w), mean, std)
  )
  print(f'the cue alone on the probe patches: {patch_nmi(truth[probe], _kmeans(_cue(xp), 3)):.3f}')
  labels = _labels(a.labels, xt, centres[train], truth[train]).astype(np.int32)
  net = model.build_model(cfg.model)
  tx = objective.make_optimizer(cfg.train)
  state = objective.create_train_state(net, tx, jax.random.PRNGKey(0), w)
  step = objective.make_train_step(net, tx, cfg.train)
  embed = model.make_embed_fn(net)
  b = cfg.train.batch_size

  def embeddings(x):
    v = {'params': state.params, 'batch_stats': state.batch_stats}
    return np.concatenate([np.asarray(embed(v, x[i : i + 500])) for i in range(0, len(x), 500)])

  for r in range(a.rounds):
    if r:
      labels = _kmeans(embeddings(xt), 20, seed=r).astype(np.int32)
    print(
      f'round {r}: labels vs reference on the training patches {patch_nmi(truth[train], labels):.3f}'
    )
    for epoch in range(a.epochs):
      order = np.random.default_rng(epoch + 100 * r).permutation(len(xt))
      for i in range(0, len(order) - b + 1, b):
        idx = order[i : i + b]
        batch = {'patches': jnp.asarray(xt[idx]), 'labels': jnp.asarray(labels[idx])}
        state, _ = step(state, {**batch, 'valid': jnp.ones(b, bool)})
    got = patch_nmi(truth[probe], _kmeans(embeddings(xp), 3))
    print(
      f'round {r}: k-means (K = 3) on the embeddings of the probe patches {got:.3f}', flush=True
    )
  return 0


if __name__ == '__main__':
  sys.exit(main())
