"""Where MNI152's NMI is decided: every split of the T1 intensity into three classes, scored.

The MNI152 benchmark (configs/mni152.py) scores a segmentation against argmax(CSF, GM, WM) of the
template's tissue maps inside the brain mask. The tissues differ mainly in intensity, so any
segmentation of it reads, above all, two intensity thresholds. This script scores every pair
(t1 < t2: CSF below t1, WM from t2 up) of the raw uint8 T1 inside the mask, from per-class
histograms (exact: the same NMI as `jule3d.scores.nmi` on the voxels), and prints

  - the best split, the splits of the two intensity baselines (their own code: k-means on 200,000
    sampled voxels, three samples, and multi-Otsu on the histogram), and the split into equal
    thirds of the voxels (what k-means reads from a rank-like embedding, README "Honest reading"),
    each with its NMI;
  - how fast the NMI falls as each threshold moves away from the best: the benchmark's sensitivity
    (a few intensity levels of 225 move it by more than a method change usually does);
  - the minima of the smoothed histogram: the places a density-seeking reading would cut.

No training, a few seconds (needs nilearn: `make mni152`).

  python bench/mni152_thresholds.py
"""

import os
import sys

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter1d

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jule3d import baselines, datasets, scores  # noqa: E402

LEVELS = 256  # raw uint8 T1


def class_histograms() -> np.ndarray:
  """[3, 256] voxel counts per (CSF, GM, WM) reference class and raw T1 value, inside the mask."""
  raw = {k: np.asarray(nib.load(p).dataobj) for k, p in datasets.mni152_files().items()}
  labels = datasets.mni152_labels(raw['t1'], raw['gm'], raw['wm'])
  t1 = raw['t1'].astype(np.int64)
  return np.stack([np.bincount(t1[labels == c], minlength=LEVELS) for c in (1, 2, 3)])


def split_nmi(hist: np.ndarray, t1: int, t2: int) -> float:
  """NMI of the split: class 1 for T1 < t1, class 2 for t1 <= T1 < t2, class 3 from t2 up."""
  cum = np.cumsum(hist, axis=1)
  low, mid = cum[:, t1 - 1], cum[:, t2 - 1] - cum[:, t1 - 1]
  return scores.nmi(np.stack([low, mid, cum[:, -1] - low - mid], axis=1))


def best_split(hist: np.ndarray) -> tuple[float, int, int]:
  """(NMI, t1, t2) of the best split, over every pair of levels inside the mask's range."""
  lo = int(np.flatnonzero(hist.sum(0))[0]) + 1
  return max(
    (split_nmi(hist, a, b), a, b) for a in range(lo, LEVELS - 1) for b in range(a + 1, LEVELS)
  )


def as_split(thresholds: np.ndarray) -> tuple[int, int]:
  """label_intensities' thresholds (class k+1 above thresholds[k]) as (t1, t2) of `split_nmi`."""
  return tuple(int(np.floor(t)) + 1 for t in thresholds)


def main() -> None:
  hist = class_histograms()
  total = hist.sum(0)
  print(f'{int(total.sum())} annotated voxels; reference shares CSF / GM / WM', end=' ')
  print(' / '.join(f'{s:.2f}' for s in hist.sum(1) / total.sum()))
  nmi, b1, b2 = best_split(hist)
  print(f'best split          T1 < {b1} | < {b2} | rest   NMI {nmi:.3f}')
  values = np.repeat(np.arange(LEVELS), total)
  for seed in (0, 1, 2):
    sample = np.random.default_rng(seed).choice(values, min(len(values), 200_000), replace=False)
    centres = baselines.fit_kmeans_intensity(sample, 3, seed, 10)
    t = as_split(baselines.kmeans_thresholds(centres))
    print(f'k-means, sample {seed}   T1 < {t[0]} | < {t[1]} | rest   NMI {split_nmi(hist, *t):.3f}')
  t = as_split(baselines.otsu_thresholds(total, np.arange(LEVELS, dtype=np.float64), 3))
  print(f'multi-Otsu          T1 < {t[0]} | < {t[1]} | rest   NMI {split_nmi(hist, *t):.3f}')
  cdf = np.cumsum(total) / total.sum()
  t = tuple(int(np.searchsorted(cdf, q)) + 1 for q in (1 / 3, 2 / 3))
  print(f'equal thirds        T1 < {t[0]} | < {t[1]} | rest   NMI {split_nmi(hist, *t):.3f}')
  print('sensitivity: NMI with one threshold moved by d levels from the best, the other kept')
  print('  d      ' + ' '.join(f'{d:+6d}' for d in range(-20, 21, 5)))
  for name, move in (('t1', lambda d: (b1 + d, b2)), ('t2', lambda d: (b1, b2 + d))):
    print(
      f'  {name}     ' + ' '.join(f'{split_nmi(hist, *move(d)):6.3f}' for d in range(-20, 21, 5))
    )
  smooth = gaussian_filter1d(total.astype(np.float64), 3)
  inside = range(int(np.flatnonzero(total)[0]) + 1, LEVELS - 1)
  minima = [v for v in inside if smooth[v] < smooth[v - 1] and smooth[v] < smooth[v + 1]]
  print(f'minima of the histogram (Gaussian, std 3 levels): {minima}')


if __name__ == '__main__':
  main()
