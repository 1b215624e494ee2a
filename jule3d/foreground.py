"""Choosing the foreground: config.data.threshold as given, or derived from the image ('otsu').

`resolve_threshold` runs once per run, right after the image is opened (pipeline._open_inputs). It
replaces 'otsu' in the run's private config copy by the number (every consumer reads
config.data.threshold as a number; config.data.threshold_rule = 'otsu' records where it came from)
and logs what fraction of the volume is foreground, for a given threshold too.

Otsu's threshold (skimage's `threshold_otsu`) is computed on a histogram built slab by slab along
axis 0, so memory is one slab and the histogram, never the volume: one bin per integer for integer
volumes whose range fits 2^16 bins, else `FLOAT_BINS` even bins between the volume's minimum and
maximum (one more pass to find them). The threshold used is the upper edge of the last bin of Otsu's
lower class: with config.data.foreground = 'above' (voxel >= threshold) the foreground is exactly
skimage's `image > threshold_otsu(image)` on integer volumes (up to one bin width on float ones).
"""

import math

import numpy as np
from absl import logging

from jule3d import baselines, patches
from jule3d.errors import UserError

FLOAT_BINS = 4096  # histogram bins of float (and wide-range integer) volumes for Otsu
_INT_BINS = 1 << 16  # integer volumes with at most this many distinct values: one bin per value
GIVEN = 'given'  # the rule of a threshold given as a number


def _range(image, depth: int) -> tuple[float, float]:
  lo, hi = math.inf, -math.inf
  for _, slab in image.slabs(depth):
    lo, hi = min(lo, slab.min().item()), max(hi, slab.max().item())
  return lo, hi


def histogram(image, slab_depth: int | None = None) -> tuple[np.ndarray, np.ndarray, float]:
  """The image's intensity histogram, built slab by slab.

  Args:
    image: the image Volume.
    slab_depth: planes per slab (default: ~8M voxels).

  Returns:
    (counts, centres, half_width): voxels per bin, each bin's centre, and the distance from a
    centre to its bin's upper edge (0.5 for one bin per integer).
  """
  depth = slab_depth or baselines.slab_depth(image.shape)
  dtype = np.dtype(image.dtype)
  if dtype.kind in 'iu' and dtype.itemsize <= 2:  # every possible value has its bin: one pass
    low, bins = int(np.iinfo(dtype).min), 1 << (8 * dtype.itemsize)
    counts = np.zeros(bins, np.int64)
    for _, slab in image.slabs(depth):
      counts += np.bincount(slab.ravel().astype(np.int64) - low, minlength=bins)
    return counts, np.arange(bins, dtype=np.float64) + low, 0.5
  lo, hi = _range(image, depth)
  if dtype.kind in 'biu' and hi - lo < _INT_BINS:
    low, bins = int(lo), int(hi - lo) + 1
    counts = np.zeros(bins, np.int64)
    for _, slab in image.slabs(depth):
      offset = slab.ravel() - slab.dtype.type(low) if dtype.kind == 'u' else slab.ravel() - low
      counts += np.bincount(offset.astype(np.int64), minlength=bins)
    return counts, np.arange(bins, dtype=np.float64) + low, 0.5
  if lo == hi:
    return np.array([math.prod(image.shape)], np.int64), np.array([float(lo)]), 0.0
  counts = np.zeros(FLOAT_BINS, np.int64)
  for _, slab in image.slabs(depth):
    counts += np.histogram(slab, bins=FLOAT_BINS, range=(lo, hi))[0]
  edges = np.linspace(lo, hi, FLOAT_BINS + 1)
  return counts, (edges[1:] + edges[:-1]) / 2, (hi - lo) / FLOAT_BINS / 2


def otsu_threshold(image, slab_depth: int | None = None) -> float:
  """Otsu's threshold of a volume, from its streamed histogram (skimage's threshold_otsu).

  Args:
    image: the image Volume.
    slab_depth: planes per slab (default: ~8M voxels).

  Returns:
    The upper edge of the last bin of Otsu's lower class, in the image's units (rounded to the
    image's float dtype, so that it is the value the comparisons use).

  Raises:
    UserError: every voxel has the same intensity (no threshold separates anything).
  """
  return _otsu(image, slab_depth)[0]


def _otsu(image, slab_depth):
  # (threshold, trimmed histogram counts, bin centres, half bin width)
  from skimage.filters import threshold_otsu

  counts, centres, half = histogram(image, slab_depth)
  nonzero = np.flatnonzero(counts)
  if len(nonzero) < 2:
    raise UserError(
      f"config.data.threshold = 'otsu': every voxel of {image.path!r} has the same intensity "
      f'({centres[nonzero[0]]:g}), so no threshold separates a foreground: give a number.'
    )
  counts, centres = counts[nonzero[0] : nonzero[-1] + 1], centres[nonzero[0] : nonzero[-1] + 1]
  # Normalised: skimage works in float32, where raw counts of a large volume lose precision.
  t = float(threshold_otsu(hist=(counts / counts.sum(), centres))) + half
  dtype = np.dtype(image.dtype)
  t = float(dtype.type(t)) if dtype.kind == 'f' else t
  return t, counts, centres, half


def foreground_voxels(
  image, threshold: float, direction: str, slab_depth: int | None = None
) -> int:
  """Number of voxels that pass the foreground test (patches.foreground), one streaming pass.

  Args:
    image: the image Volume.
    threshold: config.data.threshold (a number).
    direction: config.data.foreground ('above' or 'below').
    slab_depth: planes per slab (default: ~8M voxels).

  Returns:
    The count.
  """
  depth = slab_depth or baselines.slab_depth(image.shape)
  return sum(
    int(patches.foreground(slab, threshold, direction).sum()) for _, slab in image.slabs(depth)
  )


def resolve_threshold(config, image) -> dict:
  """Makes config.data.threshold a number ('otsu': from the image) and logs the foreground share.

  Mutates `config` (the run's private copy): data.threshold becomes a float and, for a derived
  threshold, data.threshold_rule names the rule.

  Args:
    config: the run config (data.threshold: a number or 'otsu'; data.foreground).
    image: the opened image Volume.

  Returns:
    {'value', 'rule' ('otsu' or 'given'), 'foreground_voxels', 'foreground_fraction'}.

  Raises:
    UserError: 'otsu' on a volume of a single intensity.
  """
  d = config.data
  rule = d.threshold if isinstance(d.threshold, str) else GIVEN
  count = None
  if rule == GIVEN:
    value = float(d.threshold)
  else:
    value, counts, centres, half = _otsu(image, None)
    if half == 0.5:  # one bin per integer, the threshold between two: the histogram counts exactly
      count = int(
        counts[centres > value].sum() if d.foreground == 'above' else counts[centres < value].sum()
      )
  with d.ignore_type(), d.unlocked():
    d.threshold = value
    if rule != GIVEN:
      d.threshold_rule = rule
  if count is None:
    count = foreground_voxels(image, value, d.foreground)
  total = math.prod(image.shape)
  logging.info(
    'foreground: config.data.threshold = %g (%s, %r): %.1f%% of the volume (%d of %d voxels)',
    value,
    rule,
    d.foreground,
    100 * count / total,
    count,
    total,
  )
  return {
    'value': value,
    'rule': rule,
    'foreground_voxels': count,
    'foreground_fraction': count / total,
  }
