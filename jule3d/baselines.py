"""Intensity baselines (method §6): k-means on voxel intensity and multi-threshold Otsu, K classes.

Both are fit on foreground voxels only and both are, in one dimension, a set of K-1 intensity
thresholds (k-means: the midpoints between sorted centres, i.e. nearest-centre assignment), so their
labels are 1..K ordered by intensity, 0 = background. The volume streams slab by slab along axis 0,
three passes: count foreground voxels (and, for 8/16-bit integers, build the exact histogram),
draw a seeded uniform subsample of at most `config.evaluate.kmeans_max_fit` foreground voxels,
then label. k-means is fit on the subsample; Otsu on the streamed histogram (8/16-bit integers)
or on the subsample (float and wider integers). The label volumes are written atomically to
WORKDIR/baselines/<name>.zarr with their settings and thresholds in the 'jule3d_baseline'
attribute, and reused by later runs with the same settings.
"""

import json
import math
import os
import shutil
import time

import numpy as np
from absl import logging

from jule3d import files, patches, volume
from jule3d.errors import UserError

NAMES = ('kmeans_intensity', 'multi_otsu')
_VERSION = 1  # part of a baseline's stored settings: bump when its labels would change
_SLAB_VOXELS = 8 << 20  # voxels per slab: bounds the int64 temporaries to ~64 MB each
_OTSU_WORK = 5e7  # multi-Otsu is an exhaustive search over C(bins, K-1) threshold sets


def slab_depth(shape) -> int:
  """Planes per slab along axis 0 for streaming passes: ~8M voxels, a power of 2 <= 64.

  Args:
    shape: volume shape.

  Returns:
    The slab depth.
  """
  plane = max(1, math.prod(shape[1:]))
  depth = max(1, _SLAB_VOXELS // plane)
  return min(64, 1 << (depth.bit_length() - 1))  # a power of 2 <= 64: aligned with 64-chunks


def fit_kmeans_intensity(values: np.ndarray, k: int, seed: int, restarts: int) -> np.ndarray:
  """1-D k-means on voxel intensities.

  Args:
    values: sampled foreground intensities.
    k: clusters K.
    seed: k-means seed.
    restarts: k-means++ restarts (n_init).

  Returns:
    The K centres, ascending.

  Raises:
    ValueError: fewer than K distinct values.
  """
  from sklearn.cluster import KMeans

  values = np.asarray(values, np.float64).reshape(-1, 1)
  if len(np.unique(values)) < k:
    raise ValueError(f'fewer than K = {k} distinct foreground intensities')
  km = KMeans(n_clusters=k, n_init=restarts, random_state=seed).fit(values)
  return np.sort(km.cluster_centers_.ravel())


def kmeans_thresholds(centres: np.ndarray) -> np.ndarray:
  """Nearest-centre assignment in 1-D as thresholds: midpoints between sorted centres.

  Args:
    centres: ascending centres.

  Returns:
    K-1 thresholds for `label_intensities`.
  """
  centres = np.asarray(centres, np.float64)
  return (centres[1:] + centres[:-1]) / 2


def _otsu_max_bins(k: int) -> int:
  # The largest bin count whose exhaustive search costs about _OTSU_WORK (K=3: 4096, K=4: 670,
  # K=5: 187, K=6: 92), so that a 16-bit range never means billions of threshold sets.
  bins = 2
  while bins < 4096 and math.comb(bins + 1, k - 1) <= _OTSU_WORK:
    bins += 1
  return bins


def otsu_thresholds(counts: np.ndarray, centres: np.ndarray, k: int, half_width: float = 0.0):
  """Multi-threshold Otsu (skimage) from a histogram, rebinned when it has too many bins.

  Args:
    counts: voxels per bin (e.g. one bin per integer intensity).
    centres: intensity at each bin's centre, ascending and evenly spaced.
    k: classes K.
    half_width: from a bin's centre to the largest value in it (0 for one bin per integer).

  Returns:
    K-1 thresholds for `label_intensities`: the largest value of each class but the last, so that
    the bin Otsu chose as a class's last stays in that class.

  Raises:
    ValueError: fewer than K non-empty bins.
  """
  from skimage.filters import threshold_multiotsu

  counts, centres = np.asarray(counts, np.float64), np.asarray(centres, np.float64)
  nonzero = np.flatnonzero(counts)
  if not len(nonzero):
    raise ValueError('empty histogram')
  counts, centres = counts[nonzero[0] : nonzero[-1] + 1], centres[nonzero[0] : nonzero[-1] + 1]
  width = -(-len(counts) // _otsu_max_bins(k))
  to_top = half_width
  if width > 1:
    pad = -len(counts) % width
    counts = np.concatenate([counts, np.zeros(pad)]).reshape(-1, width).sum(axis=1)
    step = centres[1] - centres[0]
    centres = centres[0] + step * (width * np.arange(len(counts)) + (width - 1) / 2)
    to_top += step * (width - 1) / 2
  # Normalised like skimage's own histogram: raw counts in its float32 arithmetic lose precision.
  prob = counts / counts.sum()
  thresholds = np.asarray(threshold_multiotsu(hist=(prob, centres), classes=k), np.float64)
  return centres[np.searchsorted(centres, thresholds)] + to_top


def label_intensities(values: np.ndarray, fg: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  """Labels 1..K by intensity class, 0 outside the foreground.

  A value above threshold i (not equal to it) is in class i + 2: skimage's `image > thresh` rule.
  (Its multi-Otsu example's plain np.digitize would move the bin Otsu chose as a class's last into
  the next class.)

  Args:
    values: intensities.
    fg: boolean foreground mask of the same shape.
    thresholds: K-1 ascending thresholds.

  Returns:
    uint8 labels.
  """
  values = np.asarray(values)
  labels = np.ones(values.shape, np.uint8)
  for t in np.asarray(thresholds, np.float64):
    if values.dtype.kind in 'iu':  # v > t <=> v > floor(t) for integers: compare in their dtype
      info = np.iinfo(values.dtype)
      if t < info.min:
        labels += 1
      elif t < info.max:
        labels += values > values.dtype.type(math.floor(t))
    else:
      labels += values > t
  labels *= fg
  return labels


def baseline_settings(image, config) -> dict:
  c = config
  return {
    'version': _VERSION,
    'image': volume.identity(image),  # its content, not its path: a moved workdir reuses it
    'shape': list(image.shape),
    'dtype': str(image.dtype),
    'k': int(c.segment.num_segments),
    'threshold': float(c.data.threshold),
    'foreground': c.data.foreground,
    'seed': int(c.seed),
    'max_fit': int(c.evaluate.kmeans_max_fit),
    'restarts': int(c.evaluate.kmeans_restarts),
  }


def stored_baseline(path: str, settings: dict) -> dict | None:
  try:
    with open(os.path.join(path, '.zattrs')) as f:
      info = json.load(f).get('jule3d_baseline')
  except (OSError, ValueError):
    return None
  if not isinstance(info, dict) or info.get('settings') != settings:
    return None
  try:
    stored = volume.open_volume(path, name='baseline')
  except UserError:
    return None
  return info if stored.shape == tuple(settings['shape']) else None


def _foreground_pass(image, fg, depth: int):
  """Foreground count per slab and, for 8/16-bit integers, the foreground histogram."""
  per_slab, hist = [], None
  small_int = image.dtype.kind in 'iu' and image.dtype.itemsize <= 2
  if small_int:
    low = int(np.iinfo(image.dtype).min)
    hist = np.zeros(1 << (8 * image.dtype.itemsize), np.int64)
  for _, slab in image.slabs(depth):
    mask = fg(slab)
    per_slab.append(int(mask.sum()))
    if small_int:
      hist += np.bincount((slab[mask].astype(np.int64) - low), minlength=len(hist))
  centres = None if hist is None else np.arange(len(hist), dtype=np.float64) + low
  return np.array(per_slab, np.int64), hist, centres


def _sample_foreground(image, fg, depth: int, per_slab: np.ndarray, size: int, seed: int):
  total = int(per_slab.sum())
  rng = np.random.default_rng([seed, 7])
  picks = np.sort(rng.choice(total, size, replace=False)) if size < total else np.arange(total)
  starts = np.concatenate([[0], np.cumsum(per_slab)])
  out = []
  for i, (_, slab) in enumerate(image.slabs(depth)):
    lo, hi = np.searchsorted(picks, [starts[i], starts[i + 1]])
    if hi > lo:
      out.append(slab[fg(slab)][picks[lo:hi] - starts[i]])
  return np.concatenate(out)


def intensity_baselines(image, config, out_dir: str, overwrite: bool = False) -> dict:
  """Computes (or reuses) the k-means-on-intensity and multi-Otsu label volumes.

  Three streaming passes over the image (count + histogram, sample, label); the two label volumes
  are written together, atomically, to out_dir/<name>.zarr with their settings and thresholds in
  the 'jule3d_baseline' attribute. Stores with the same settings are reused unless `overwrite`.

  Args:
    image: the image Volume.
    config: the run config (segment.num_segments, seed, data.threshold/foreground,
      evaluate.kmeans_max_fit, evaluate.kmeans_restarts).
    out_dir: folder of the baseline stores (created if needed).
    overwrite: recompute even when valid stores exist.

  Returns:
    name -> {'path', 'thresholds', 'reused', and 'centres' for k-means}, or {'skipped': reason}
    for a baseline that cannot give K classes on this volume.
  """
  c = config
  k = int(c.segment.num_segments)
  settings = baseline_settings(image, c)
  paths = {name: os.path.join(out_dir, f'{name}.zarr') for name in NAMES}
  stored = {name: stored_baseline(path, settings) for name, path in paths.items()}
  if not overwrite and all(stored.values()):
    logging.info('reusing the baselines in %s (same settings)', out_dir)
    return {name: {'path': paths[name], 'reused': True, **stored[name]['result']} for name in paths}
  os.makedirs(out_dir, exist_ok=True)
  fg = lambda v: patches.foreground(v, c.data.threshold, c.data.foreground)
  depth = slab_depth(image.shape)
  t0 = time.time()
  per_slab, hist, centres = _foreground_pass(image, fg, depth)
  if not per_slab.sum():
    raise UserError(
      f'no voxel of {image.path!r} is foreground (config.data.threshold = {c.data.threshold}, '
      f'config.data.foreground = {c.data.foreground!r}): check the threshold.'
    )
  sample = _sample_foreground(image, fg, depth, per_slab, int(c.evaluate.kmeans_max_fit), c.seed)
  results = {}
  try:
    km_centres = fit_kmeans_intensity(sample, k, c.seed, int(c.evaluate.kmeans_restarts))
    results['kmeans_intensity'] = {
      'centres': km_centres.tolist(),
      'thresholds': kmeans_thresholds(km_centres).tolist(),
    }
  except ValueError as e:
    results['kmeans_intensity'] = {'skipped': str(e)}
  try:
    if hist is None:  # float or wide integers: Otsu on the sample, evenly binned
      counts, edges = np.histogram(sample, bins=min(256, _otsu_max_bins(k)))
      hist, centres, half = counts, (edges[1:] + edges[:-1]) / 2, (edges[1] - edges[0]) / 2
    else:
      half = 0.0
    results['multi_otsu'] = {'thresholds': otsu_thresholds(hist, centres, k, half).tolist()}
  except ValueError as e:
    results['multi_otsu'] = {'skipped': str(e)}
  _write_baselines(image, fg, depth, paths, results, settings)
  logging.info('baselines: %s (%.1fs)', results, time.time() - t0)
  return {
    name: ({'path': paths[name], 'reused': False, **r} if 'skipped' not in r else r)
    for name, r in results.items()
  }


def _write_baselines(image, fg, depth, paths, results, settings) -> None:
  todo = {n: r for n, r in results.items() if 'skipped' not in r}
  tmps = {n: files.temp_path(paths[n]) for n in todo}
  try:
    stores = {
      n: volume.create_zarr(
        tmps[n], image.shape, np.uint8, image.spacing, image.affine,
        jule3d_baseline={'settings': settings, 'result': todo[n]},
      )
      for n in todo
    }  # fmt: skip
    pending = []
    for z0, slab in image.slabs(depth):
      mask = fg(slab)
      writes = [
        stores[n][z0 : z0 + len(slab)].write(label_intensities(slab, mask, r['thresholds']))
        for n, r in todo.items()
      ]
      for w in pending:
        w.result()  # one slab of writes in flight while the next slab is labelled
      pending = writes
    for w in pending:
      w.result()
    for n in todo:
      volume.commit_zarr(tmps[n], paths[n])
  except BaseException:
    for tmp in tmps.values():
      shutil.rmtree(tmp, ignore_errors=True)
    raise
