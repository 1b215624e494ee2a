"""Region statistics, the hand-made texture feature and the separability of the regions."""

import numpy as np
from scipy import ndimage

from jule3d.phantom.generate import THRESHOLD


def region_statistics(
  image: np.ndarray, labels: np.ndarray, threshold: float = THRESHOLD, window: int = 7
) -> dict[int, dict[str, float]]:
  """Per-region intensity and texture statistics (the phantom's design targets).

  Args:
    image: 3D image.
    labels: 3D labels, 0 = background.
    threshold: foreground threshold (`image >= threshold`).
    window: edge of the cubic window of the local std.

  Returns:
    For each label present except 0: 'share' (of all labelled voxels), 'foreground_fraction',
    'mean_all', 'mean_foreground', 'local_std' (mean over the region of the window std).
  """
  img = np.asarray(image, np.float32)
  local_std = _local_std(img, window)
  fg = img >= threshold
  total = np.count_nonzero(labels)
  stats = {}
  for k in np.unique(labels):
    if k == 0:
      continue
    region = labels == k
    stats[int(k)] = {
      'share': float(np.count_nonzero(region) / total),
      'foreground_fraction': float(fg[region].mean()),
      'mean_all': float(img[region].mean()),
      'mean_foreground': float(img[region & fg].mean()) if (region & fg).any() else float('nan'),
      'local_std': float(local_std[region].mean()),
    }
  return stats


def texture_feature(image: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
  """A one-number-per-voxel texture feature: local std of the foreground voxels.

  The std of the `>= threshold` voxels in a 5^3 window, averaged over a 7^3 window. Restricting it
  to foreground voxels keeps the air outside the specimen from making the specimen's surface look
  like alveolar foam; the alveolar air itself still shows as the walls' blurred profiles.

  Args:
    image: 3D image.
    threshold: foreground threshold.

  Returns:
    float32 array of the image's shape.
  """
  img = np.asarray(image, np.float32)
  m = (img >= threshold).astype(np.float32)
  count = np.maximum(ndimage.uniform_filter(m, 5), 1e-6)
  mean = ndimage.uniform_filter(img * m, 5) / count
  mean_sq = ndimage.uniform_filter(img * img * m, 5) / count
  std = np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))
  return ndimage.uniform_filter(std, 7)


def separability(
  image: np.ndarray,
  labels: np.ndarray,
  threshold: float = THRESHOLD,
  max_voxels: int = 50_000,
  seed: int = 0,
) -> dict[str, float]:
  """NMI of 3-means on foreground intensity and on `texture_feature`, vs the labels.

  Scored on labelled foreground voxels (a seeded subsample of at most `max_voxels`), with
  sklearn's geometric-mean NMI as in method §6.

  Args:
    image: 3D image.
    labels: 3D labels, 0 = background (not scored).
    threshold: foreground threshold.
    max_voxels: subsample size for k-means.
    seed: subsample and k-means seed.

  Returns:
    {'intensity_nmi': ..., 'texture_nmi': ...}.
  """
  from sklearn.cluster import KMeans
  from sklearn.metrics import normalized_mutual_info_score

  img = np.asarray(image, np.float32)
  where = np.flatnonzero((img >= threshold) & (labels > 0))
  rng = np.random.default_rng(seed)
  if where.size > max_voxels:
    where = np.sort(rng.choice(where, max_voxels, replace=False))
  truth = labels.ravel()[where]
  out = {}
  for name, values in (('intensity', img), ('texture', texture_feature(img, threshold))):
    x = values.ravel()[where].astype(np.float64)[:, None]
    pred = KMeans(3, n_init=4, random_state=seed).fit_predict((x - x.mean()) / x.std())
    out[f'{name}_nmi'] = float(
      normalized_mutual_info_score(truth, pred, average_method='geometric')
    )
  return out


def _local_std(img, window):
  mean = ndimage.uniform_filter(img, window)
  mean_sq = ndimage.uniform_filter(img * img, window)
  return np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))
