"""Does local context help on MNI152 without labels? The same per-voxel inputs, read three ways.

README "Where the limit lies" asks what a learned representation could add to the intensity on the
MNI152 benchmark (configs/mni152.py: argmax(CSF, GM, WM) inside the brain mask). This script
takes hand-made per-voxel inputs (the raw T1 value, alone and beside its local context: the T1
Gaussian-smoothed at a few scales, the 3^3 neighbourhood's minimum and maximum) and reads each

  - without labels: k-means (K = 3, the reading of jule3d's phase 2 and of the intensity baseline)
    and a 3-component Gaussian mixture with full covariances (as in Atropos), each fitted on
    200,000 sampled mask voxels and scored on all of them, each alone and followed by a Potts MRF
    on the voxel grid (jule3d/regularise.py's ICM; k-means with the recommended method's data
    term and weight, segment.smoothing = 1; the mixture with its negative log posterior as the
    data term and a weight of 0.5 nats per disagreeing neighbour, as Atropos and FSL FAST
    regularise a mixture); seeds 0, 1, 2;
  - with labels, as the bound of what the inputs hold: a gradient-boosted tree (scikit-learn's
    HistGradientBoostingClassifier) trained on 100,000 sampled mask voxels with their reference
    tissue, scored on every other mask voxel; seed 0.

Columns are standardised over the mask (jule3d/descriptors.standardise). NMI geometric, as the
report's. If context lifts the supervised reading but no unsupervised one, a method that clusters
(JULE included) cannot turn it into a better segmentation by giving its features context: the
clusters follow the intensity and what context adds is read as a factor of its own, not as the
tissue.

No training of the CNN; about four minutes on 2 cores (needs nilearn: `make mni152`).

  python bench/mni152_context.py
"""

import os
import sys

import nibabel as nib
import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jule3d import datasets, descriptors, regularise, scores  # noqa: E402

# name -> the context columns beside the intensity: ('smooth', std) or ('min' | 'max', edge).
INPUTS = {
  'intensity alone': (),
  '+ smoothed, std 1': (('smooth', 1.0),),
  '+ smoothed, std 2': (('smooth', 2.0),),
  '+ smoothed, std 2 and 4': (('smooth', 2.0), ('smooth', 4.0)),
  '+ 3^3 minimum and maximum': (('min', 3), ('max', 3)),
}
FIT, TRAIN = 200_000, 100_000
KMEANS_BETA, GMM_BETA = 1.0, 0.5  # Potts weights: k-means distortion units; nats of the mixture


def columns(t1: np.ndarray, mask: np.ndarray, context: tuple) -> np.ndarray:
  """[mask voxels, 1 + len(context)] float64: the intensity, then each context column.

  Args:
    t1: [Z, Y, X] intensities (the whole volume: context reaches past the mask).
    mask: [Z, Y, X] bool, the voxels to describe.
    context: ('smooth', std) | ('min', edge) | ('max', edge) entries.

  Returns:
    One row per mask voxel, in np.nonzero order.
  """
  x = np.asarray(t1, np.float64)
  out = [x[mask]]
  for kind, size in context:
    if kind == 'smooth':
      out.append(ndimage.gaussian_filter(x, size, mode='mirror')[mask])
    elif kind in ('min', 'max'):
      fn = ndimage.minimum_filter if kind == 'min' else ndimage.maximum_filter
      out.append(fn(x, size=int(size), mode='mirror')[mask])
    else:
      raise ValueError(f'unknown context {kind!r}')
  return np.stack(out, axis=1)


def nmi(truth: np.ndarray, pred: np.ndarray) -> float:
  """The report's NMI of two label vectors (jule3d.scores' contingency table, as one plane)."""
  return scores.nmi(scores.contingency(truth[None], pred[None]))


def unsupervised(
  f: np.ndarray, truth: np.ndarray, seed: int, voxels: np.ndarray | None = None, fit: int = FIT
) -> dict[str, float]:
  """k-means and a full-covariance GMM, K = 3, fitted on `fit` sampled rows, scored on all; with
  `voxels` ([rows, 3] positions of the rows on the voxel grid) also each followed by Potts ICM."""
  from sklearn.cluster import KMeans
  from sklearn.mixture import GaussianMixture

  rows = np.random.default_rng(seed).choice(len(f), min(fit, len(f)), replace=False)
  km = KMeans(3, n_init=10, random_state=seed).fit(f[rows])
  gmm = GaussianMixture(3, covariance_type='full', n_init=3, random_state=seed).fit(f[rows])
  out = {}
  terms = {
    'k-means': (regularise.unary_terms(km.transform(f) ** 2), KMEANS_BETA),
    'GMM': (-np.log(np.maximum(gmm.predict_proba(f).astype(np.float64), 1e-300)), GMM_BETA),
  }
  for name, (unary, beta) in terms.items():
    labels = np.argmin(unary, axis=1) + 1
    out[name] = nmi(truth, labels)
    if voxels is not None:
      smooth, _ = regularise.potts_icm(voxels, labels, unary.astype(np.float32), 1, beta)
      out[name + ' + Potts'] = nmi(truth, smooth)
  return out


def supervised(f: np.ndarray, truth: np.ndarray, seed: int = 0, train: int = TRAIN) -> float:
  """A gradient-boosted tree trained on `train` sampled rows, NMI on every other row."""
  from sklearn.ensemble import HistGradientBoostingClassifier

  rows = np.random.default_rng(seed).choice(len(f), min(train, len(f) // 2), replace=False)
  held = np.ones(len(f), bool)
  held[rows] = False
  clf = HistGradientBoostingClassifier(random_state=seed).fit(f[rows], truth[rows])
  return nmi(truth[held], clf.predict(f[held]))


def main() -> None:
  raw = {k: np.asarray(nib.load(p).dataobj) for k, p in datasets.mni152_files().items()}
  labels = datasets.mni152_labels(raw['t1'], raw['gm'], raw['wm'])
  mask = labels > 0
  truth = labels[mask].astype(np.int64)
  voxels = np.argwhere(mask)
  readings = ('k-means', 'k-means + Potts', 'GMM', 'GMM + Potts')
  print(
    f'{mask.sum()} annotated voxels; NMI, unsupervised seeds 0 / 1 / 2 (mean), supervised seed 0'
  )
  print('| input per voxel | ' + ' | '.join(readings) + ' | supervised tree |')
  print('|---' * (len(readings) + 2) + '|')
  for name, context in INPUTS.items():
    f = descriptors.standardise(columns(raw['t1'], mask, context))
    runs = [unsupervised(f, truth, seed, voxels) for seed in (0, 1, 2)]
    cells = []
    for method in readings:
      v = [r[method] for r in runs]
      cells.append(' / '.join(f'{x:.3f}' for x in v) + f' ({np.mean(v):.3f})')
    print(f'| {name} | ' + ' | '.join(cells) + f' | {supervised(f, truth):.3f} |', flush=True)


if __name__ == '__main__':
  main()
