"""Patch geometry (method §1): foreground centres, training samples, batched reads, normalisation.

Coordinates are voxel indices along the volume's array axes (axis 0 first). A patch of odd edge `w`
centred on `c` covers `[c - w//2, c + w//2]` on each axis; it lies inside the volume when
`w//2 <= c < shape - w//2`. Reads go through tensorstore in slabs along axis 0: one read per slab of
patches (never one per patch), with the next slab's read in flight while the current one is cut.
"""

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jule3d import progress
from jule3d.errors import UserError
from jule3d.volume import read_ahead


def foreground(values: np.ndarray, threshold: float, direction: str) -> np.ndarray:
  """Boolean mask of specimen voxels.

  Args:
    values: voxel intensities (any shape).
    threshold: intensity threshold in the volume's units.
    direction: 'above' (values >= threshold) or 'below' (values <= threshold).

  Returns:
    A boolean array of the same shape.
  """
  if direction == 'above':
    return values >= threshold
  if direction == 'below':
    return values <= threshold
  raise UserError(f"config.data.foreground = {direction!r}: expected 'above' or 'below'.")


def in_domain(
  values: np.ndarray,
  threshold: float,
  direction: str,
  interior=None,
  coords=None,
  envelope: bool = False,
) -> np.ndarray:
  """Where patch centres may go: foreground, or inside the specimen (config.patches.domain).

  Args:
    values: a 3D block of voxel intensities.
    threshold: intensity threshold.
    direction: 'above' or 'below'.
    interior: a jule3d.specimen.Interior for the 'specimen' domain; None: foreground only.
    coords: (z, y, x) index arrays of the block's voxels along each axis (with `interior`).
    envelope: where labels go instead (the fill's domain): the specimen's envelope when the
      interior holds one (config.segment.fill_envelope), else the same domain.

  Returns:
    bool array of the block's shape.
  """
  fg = foreground(values, threshold, direction)
  if interior is None:
    return fg
  return interior.inside(fg, *coords, envelope=envelope)


def centre_bounds(shape: tuple[int, ...], patch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-axis [lo, hi) range of centres whose patch lies fully inside the volume.

  Args:
    shape: volume shape.
    patch_size: odd patch edge.

  Returns:
    (lo, hi) int arrays; an axis with hi <= lo has no valid centre.
  """
  h = patch_size // 2
  lo = np.full(len(shape), h, dtype=np.int64)
  hi = np.asarray(shape, dtype=np.int64) - h
  return lo, hi


def check_fits(shape: tuple[int, ...], patch_size: int) -> None:
  """Raises UserError when an axis of the volume is shorter than one patch."""
  for axis, size in enumerate(shape):
    if size < patch_size:
      raise UserError(
        f'volume axis {axis} has {size} voxels, smaller than one patch '
        f'(config.patches.patch_size = {patch_size}): use a smaller patch or a larger volume.'
      )


def _slab_ranges(lo: int, hi: int, depth: int) -> Iterator[tuple[int, int]]:
  for z0 in range(lo, hi, depth):
    yield z0, min(z0 + depth, hi)


def count_foreground_centres(
  volume, patch_size: int, threshold: float, direction: str, slab_depth: int = 64, interior=None
) -> np.ndarray:
  """Number of valid foreground centres on every plane of axis 0.

  Args:
    volume: a jule3d.volume.Volume.
    patch_size: odd patch edge.
    threshold: foreground threshold.
    direction: 'above' or 'below'.
    slab_depth: planes read at once (memory is one slab).
    interior: the specimen's Interior for the 'specimen' domain (in_domain); None: foreground.

  Returns:
    int64 array of length shape[0] (0 outside the valid centre range).
  """
  check_fits(volume.shape, patch_size)
  lo, hi = centre_bounds(volume.shape, patch_size)
  counts = np.zeros(volume.shape[0], dtype=np.int64)
  for z0, z1 in _slab_ranges(int(lo[0]), int(hi[0]), slab_depth):
    slab = volume.store[z0:z1, lo[1] : hi[1], lo[2] : hi[2]].read().result()
    coords = (np.arange(z0, z1), np.arange(lo[1], hi[1]), np.arange(lo[2], hi[2]))
    counts[z0:z1] = in_domain(slab, threshold, direction, interior, coords).sum(axis=(1, 2))
  return counts


def require_centres(total: int, num: int, threshold: float, direction: str) -> None:
  """Raises UserError when fewer than `num` valid foreground centres exist.

  Args:
    total: valid foreground centres (count_foreground_centres(...).sum()).
    num: centres wanted (n_s).
    threshold: foreground threshold (for the message).
    direction: 'above' or 'below' (for the message).
  """
  if total < num:
    raise UserError(
      f'only {total} voxels pass the foreground threshold (config.data.threshold = {threshold}, '
      f"'{direction}') with a whole patch inside the volume, fewer than "
      f'config.patches.num_patches = {num}: lower num_patches or change the threshold.'
    )


def sample_centres(
  volume,
  num: int,
  patch_size: int,
  threshold: float,
  direction: str,
  seed: int,
  slab_depth: int = 64,
  interior=None,
) -> np.ndarray:
  """Uniform random foreground centres whose patch lies inside the volume, without replacement.

  Two streaming passes (count per plane, then pick), so memory is one slab, never the volume.

  Args:
    volume: a jule3d.volume.Volume.
    num: number of centres (n_s).
    patch_size: odd patch edge.
    threshold: foreground threshold.
    direction: 'above' or 'below'.
    seed: sampling seed (same seed -> same centres).
    slab_depth: planes read at once.
    interior: the specimen's Interior for the 'specimen' domain (in_domain); None: foreground.

  Returns:
    int32 array [num, 3] of centres in raster order.

  Raises:
    UserError: fewer valid foreground centres than `num`.
  """
  counts = count_foreground_centres(volume, patch_size, threshold, direction, slab_depth, interior)
  total = int(counts.sum())
  require_centres(total, num, threshold, direction)
  ranks = np.sort(np.random.default_rng(seed).choice(total, size=num, replace=False))
  plane_start = np.concatenate([[0], np.cumsum(counts)])
  plane_of_rank = np.searchsorted(plane_start, ranks, side='right') - 1
  lo, hi = centre_bounds(volume.shape, patch_size)
  width = int(hi[2] - lo[2])
  out = np.empty((num, 3), dtype=np.int32)
  planes = np.unique(plane_of_rank)
  done = 0
  shown = progress.Progress('sampling training centres', int(hi[0] - lo[0]), 'planes')
  for z0, z1 in _slab_ranges(int(lo[0]), int(hi[0]), slab_depth):
    shown.update(int(z1 - lo[0]))
    wanted = planes[(planes >= z0) & (planes < z1)]
    if wanted.size == 0:
      continue
    slab = volume.store[z0:z1, lo[1] : hi[1], lo[2] : hi[2]].read().result()
    coords = (np.arange(z0, z1), np.arange(lo[1], hi[1]), np.arange(lo[2], hi[2]))
    dom = in_domain(slab, threshold, direction, interior, coords)
    for z in wanted:
      flat = np.flatnonzero(dom[z - z0])
      picked = flat[ranks[plane_of_rank == z] - plane_start[z]]
      n = picked.size
      out[done : done + n, 0] = z
      out[done : done + n, 1] = picked // width + lo[1]
      out[done : done + n, 2] = picked % width + lo[2]
      done += n
  assert done == num
  return out


def _group_by_slab(centres: np.ndarray, depth: int) -> list[np.ndarray]:
  """Indices of `centres` grouped by axis-0 slab, each group sorted (stable) by axis 0."""
  order = np.argsort(centres[:, 0], kind='stable')
  slab = centres[order, 0] // depth
  cuts = np.flatnonzero(np.diff(slab)) + 1
  return np.split(order, cuts)


def iter_patches(
  volume, centres: np.ndarray, patch_size: int, slab_depth: int = 32
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Reads patches slab by slab: one tensorstore read per slab, the next one already in flight.

  Args:
    volume: a jule3d.volume.Volume.
    centres: int array [N, 3] of valid centres.
    patch_size: odd patch edge.
    slab_depth: centre planes per read (memory ~ (slab_depth + w) x box of the group's centres).

  Yields:
    (indices into `centres`, patches [n, w, w, w] in the volume's dtype) per slab.
  """
  if len(centres) == 0:
    return
  h = patch_size // 2
  groups = _group_by_slab(np.asarray(centres), slab_depth)
  boxes = [(centres[g].min(axis=0) - h, centres[g].max(axis=0) + h + 1) for g in groups]

  def start(i: int):
    lo, hi = boxes[i]
    return volume.store[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].read()

  for i, box in read_ahead(range(len(groups)), start):
    group, lo = groups[i], boxes[i][0]
    windows = np.lib.stride_tricks.sliding_window_view(box, (patch_size,) * 3)
    rel = centres[group] - lo - h
    yield group, windows[rel[:, 0], rel[:, 1], rel[:, 2]]


def read_patches(volume, centres: np.ndarray, patch_size: int, slab_depth: int = 32) -> np.ndarray:
  """All patches at `centres`, in the order of `centres`, in the volume's dtype (float64 -> float32).

  Args:
    volume: a jule3d.volume.Volume.
    centres: int array [N, 3] of valid centres.
    patch_size: odd patch edge.
    slab_depth: centre planes per read.

  Returns:
    Array [N, w, w, w].
  """
  dtype = np.float32 if volume.dtype == np.float64 else volume.dtype
  out = np.empty((len(centres),) + (patch_size,) * 3, dtype=dtype)
  shown, done = progress.Progress('reading training patches', len(centres), 'patches'), 0
  for idx, patches in iter_patches(volume, centres, patch_size, slab_depth):
    out[idx] = patches
    done += len(patches)
    shown.update(done)
  return out


def patch_sums(patches: np.ndarray, chunk: int = 512) -> np.ndarray:
  """[sum, sum of squares, count] over all voxels of `patches`, in float64, chunk by chunk.

  Args:
    patches: [N, w, w, w] array.
    chunk: patches summed at once (bounds the float64 temporaries).

  Returns:
    float64 [3].
  """
  total = 0.0
  total_sq = 0.0
  count = 0
  for i in range(0, len(patches), chunk):
    x = patches[i : i + chunk].astype(np.float64)
    total += x.sum()
    total_sq += np.square(x).sum()
    count += x.size
  return np.array([total, total_sq, count], np.float64)


def stats_from_sums(sums: np.ndarray) -> tuple[float, float]:
  """(mean, std) from patch_sums (added over several readers, if any).

  Args:
    sums: [sum, sum of squares, count].

  Returns:
    (mean, std) as Python floats.

  Raises:
    UserError: all patch voxels are identical (std 0): nothing to learn from.
  """
  total, total_sq, count = (float(v) for v in sums)
  mean = total / count
  var = max(total_sq / count - mean * mean, 0.0)
  std = float(np.sqrt(var))
  if not std > 0:
    raise UserError(
      'every voxel of the training patches has the same value: the volume has no texture to learn '
      'from (check config.data.path and config.data.threshold).'
    )
  return float(mean), std


def normalise(x, mean: float, std: float):
  """(x - mean) / std in float32 (method §1): the one normalisation of every patch the CNN sees.

  Args:
    x: numpy or jax array in the volume's dtype (also inside jit).
    mean: normalisation mean of the training patches.
    std: their std.

  Returns:
    The same kind of array, float32.
  """
  xp = jnp if isinstance(x, jax.Array) else np
  return (x.astype(xp.float32) - xp.asarray(mean, xp.float32)) / xp.asarray(std, xp.float32)


def patch_stats(patches: np.ndarray, chunk: int = 512) -> tuple[float, float]:
  """Mean and std over all voxels of all training patches (method §1 normalisation), float64 sums.

  Args:
    patches: [N, w, w, w] array.
    chunk: patches summed at once (bounds the float64 temporaries).

  Returns:
    (mean, std) as Python floats.

  Raises:
    UserError: all patch voxels are identical (std 0): nothing to learn from.
  """
  return stats_from_sums(patch_sums(patches, chunk))
