"""The working grid: where the method runs when the input's own grid does not suit 3D patches.

A patch is a cube of w voxels. On an anisotropic scan (a clinical CT of 0.57 x 0.57 x 5 mm) that
cube spans 15 mm in-plane and 135 mm across slices; on a scan thinner than w voxels along an axis
no voxel has a centred patch at all. So the method (training, grid features, k-means, fill) runs on
a WORKING copy of the volume, and the labels are written back onto the input's grid, with the
input's geometry, for every output:

  * Resampling (a data fact, not a tuning knob): when the largest voxel edge exceeds the smallest
    by more than config.data.max_anisotropy (1.5), the volume is resampled, trilinearly, to
    near-isotropic voxels of edge config.data.resample_spacing, by default the geometric mean of
    the three spacings: the same voxel volume, so about as many voxels, memory and runtime as the
    input. Each axis gets round(extent / edge) voxels spanning exactly the input's extent (voxel
    centres aligned the way ITK and scikit-image resample), so the edges stay within a few % of
    each other. Near-isotropic scans (micro-CT, MNI152) are not touched.
  * Padding: an axis with fewer than w voxels (after resampling) is padded by w // 2 on each side
    with the volume mirrored (symmetric reflection, repeated if needed), so every plane along it
    has centred patches, whose context past the face is the mirrored volume. Other axes keep the
    segment.fill rule at their faces (the nearest grid block).
  * The way back: every input voxel takes the label of the nearest working voxel; with
    config.segment.fill, a foreground input voxel that lands on an unlabelled working voxel (a
    thin structure the interpolation pulled under the threshold) takes its nearest labelled
    neighbour's label on the input grid, so 100% of the foreground is labelled.

The copy is streamed slab by slab into WORKDIR/cache (like the converted inputs, reused by later
runs) and never holds the volume in memory. The reference labels and the baselines stay on the
input grid: scores are always computed there.
"""

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Sequence

import numpy as np
from absl import logging

from jule3d import volume

_VERSION = 1  # part of the cache key: bump it when the working copy's content changes


@dataclasses.dataclass(frozen=True)
class Grid:
  """How the working volume's voxels sit on the input's (module docstring).

  Attributes:
    input_shape: voxels of the input per axis.
    size: voxels per axis after resampling, before padding.
    pad: voxels of mirrored volume added on each side of every axis.
    scale: input voxels per working voxel along each axis (input extent / size).
  """

  input_shape: tuple[int, int, int]
  size: tuple[int, int, int]
  pad: tuple[int, int, int]
  scale: tuple[float, float, float]

  @property
  def shape(self) -> tuple[int, int, int]:
    """The working volume's shape (resampled and padded)."""
    return tuple(n + 2 * p for n, p in zip(self.size, self.pad, strict=True))

  @property
  def resampled(self) -> bool:
    """Whether any axis is resampled (else the working voxels are input voxels)."""
    return self.size != self.input_shape

  def input_coordinates(self, axis: int, index: np.ndarray) -> np.ndarray:
    """Working indices along `axis` -> the input coordinates (voxel units) they sample.

    Args:
      axis: 0, 1 or 2.
      index: working (padded) indices.

    Returns:
      float64 input coordinates; padded indices sample the mirrored volume.
    """
    n, p, s = self.size[axis], self.pad[axis], self.scale[axis]
    r = np.mod(np.asarray(index, np.int64) - p, 2 * n)  # symmetric reflection, any pad width
    r = np.where(r >= n, 2 * n - 1 - r, r)
    x = (r + 0.5) * s - 0.5
    return np.clip(x, 0.0, self.input_shape[axis] - 1)

  def nearest_working(self, axis: int, index: np.ndarray) -> np.ndarray:
    """Input indices along `axis` -> the nearest working (padded) index, never in the padding.

    Args:
      axis: 0, 1 or 2.
      index: input voxel indices.

    Returns:
      int64 working indices.
    """
    n, p, s = self.size[axis], self.pad[axis], self.scale[axis]
    w = np.floor((np.asarray(index, np.float64) + 0.5) / s).astype(np.int64)
    return np.clip(w, 0, n - 1) + p

  def spacing(self, input_spacing: Sequence[float]) -> tuple[float, float, float]:
    """The working voxel edges, from the input's."""
    return tuple(float(s) * k for s, k in zip(input_spacing, self.scale, strict=True))

  def input_voxels(self, points: np.ndarray) -> np.ndarray:
    """Working voxels [N, 3] -> the nearest input voxels [N, 3] (e.g. to read the reference)."""
    points = np.asarray(points)
    return np.stack(
      [np.rint(self.input_coordinates(a, points[:, a])).astype(np.int64) for a in range(3)], axis=1
    ).reshape(points.shape)

  def affine(self, input_affine: np.ndarray | None, input_spacing: Sequence[float]) -> np.ndarray:
    """The working volume's voxel-to-world matrix: the same world as the input's.

    Args:
      input_affine: the input's 4x4 matrix, or None (then diag(input_spacing)).
      input_spacing: the input's spacing.

    Returns:
      4x4 float64.
    """
    base = np.diag([*map(float, input_spacing), 1.0]) if input_affine is None else input_affine
    to_input = np.eye(4)
    for a in range(3):
      to_input[a, a] = self.scale[a]
      to_input[a, 3] = 0.5 * self.scale[a] - 0.5 - self.pad[a] * self.scale[a]
    return np.asarray(base, np.float64) @ to_input


def plan(
  shape: Sequence[int],
  spacing: Sequence[float],
  patch_size: int,
  max_anisotropy: float,
  resample_spacing: float = 0.0,
) -> Grid | None:
  """The working grid of a volume (module docstring), or None when it is the input's own.

  Args:
    shape: the input's shape.
    spacing: the input's voxel edges (file units).
    patch_size: w.
    max_anisotropy: resample when max(spacing) / min(spacing) exceeds this; 0 = never.
    resample_spacing: the working voxel edge; 0 = the geometric mean of `spacing`.

  Returns:
    The Grid, or None (no resampling, no padding).
  """
  shape = tuple(int(n) for n in shape)
  spacing = tuple(float(s) for s in spacing)
  size = shape
  if max_anisotropy > 0 and max(spacing) > max_anisotropy * min(spacing):
    edge = resample_spacing or math.prod(spacing) ** (1.0 / 3.0)
    size = tuple(max(1, round(n * s / edge)) for n, s in zip(shape, spacing, strict=True))
  pad = tuple(patch_size // 2 if n < patch_size else 0 for n in size)
  if size == shape and not any(pad):
    return None
  scale = tuple(n / m for n, m in zip(shape, size, strict=True))
  return Grid(input_shape=shape, size=size, pad=pad, scale=scale)


def describe(grid: Grid, spacing: Sequence[float]) -> str:
  """One line for the log and the report: what the working grid is and why."""
  parts = []
  if grid.resampled:
    edges = ', '.join(f'{e:.4g}' for e in grid.spacing(spacing))
    parts.append(
      f'resampled from {grid.input_shape} voxels of ({", ".join(f"{s:.4g}" for s in spacing)}) '
      f'to {grid.size} voxels of ({edges}) (anisotropic input)'
    )
  padded = [a for a in range(3) if grid.pad[a]]
  if padded:
    parts.append(
      f'axes {padded} padded by {[grid.pad[a] for a in padded]} mirrored voxels on each side '
      '(thinner than a patch)'
    )
  return '; '.join(parts)


def _interpolate(block: np.ndarray, axis: int, coords: np.ndarray, lo: int) -> np.ndarray:
  # Linear interpolation of `block` (holding input indices lo.. along `axis`) at `coords`.
  i0 = np.floor(coords).astype(np.int64)
  frac = coords - i0
  i0 = i0 - lo
  if not frac.any():
    return np.take(block, i0, axis=axis)
  i1 = np.minimum(i0 + 1, block.shape[axis] - 1)
  f = frac.astype(np.float32).reshape([-1 if a == axis else 1 for a in range(block.ndim)])
  a = np.take(block, i0, axis=axis).astype(np.float32)
  b = np.take(block, i1, axis=axis).astype(np.float32)
  return a + f * (b - a)


def sample(vol: volume.Volume, grid: Grid, z0: int, z1: int) -> np.ndarray:
  """Working planes [z0, z1) of `vol` (resampled and padded).

  Args:
    vol: the input Volume.
    grid: its working Grid.
    z0: first working plane.
    z1: end working plane.

  Returns:
    [z1 - z0, *grid.shape[1:]]: float32 when resampled, else the input's dtype.
  """
  ranges = ((z0, z1), (0, grid.shape[1]), (0, grid.shape[2]))
  coords = [grid.input_coordinates(a, np.arange(*r)) for a, r in enumerate(ranges)]
  lo = int(np.floor(coords[0].min()))
  hi = min(int(np.ceil(coords[0].max())) + 1, vol.shape[0])
  out = vol.read((lo, 0, 0), (hi, vol.shape[1], vol.shape[2]))
  for axis in range(3):
    out = _interpolate(out, axis, coords[axis], lo if axis == 0 else 0)
  return out.astype(np.float32) if grid.resampled else out


def _cache_key(vol: volume.Volume, grid: Grid) -> str:
  # Named by the input's content (volume.identity), not its path: a moved workdir or scan reuses it.
  key = [_VERSION, volume.identity(vol), dataclasses.asdict(grid)]
  return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def working_volume(
  vol: volume.Volume, grid: Grid, cache_dir: str, chunk: int = 64
) -> volume.Volume:
  """The working copy of `vol` (module docstring), streamed into `cache_dir` once and reused.

  Args:
    vol: the input Volume.
    grid: its working Grid (from `plan`).
    cache_dir: folder of the copy (WORKDIR/cache).
    chunk: zarr chunk edge.

  Returns:
    The working volume, opened; its affine maps its voxels to the same world as the input's.

  Raises:
    UserError: the cache folder cannot be written.
  """
  final = os.path.join(cache_dir, f'working-{_cache_key(vol, grid)}.zarr')
  affine = grid.affine(vol.affine, vol.spacing)
  spacing = grid.spacing(vol.spacing)
  dtype = np.float32 if grid.resampled else vol.dtype
  depth = max(1, min(chunk, (256 << 20) // max(1, grid.shape[1] * grid.shape[2] * 4)))

  def slabs():
    logging.info('writing the working copy %s', final)
    for z0 in range(0, grid.shape[0], depth):
      yield z0, sample(vol, grid, z0, min(z0 + depth, grid.shape[0]))

  what = 'working copy of config.data.path'
  return volume.derived_copy(final, grid.shape, dtype, spacing, affine, chunk, slabs, what)


def to_input(labels: volume.Volume, grid: Grid, z0: int, z1: int) -> np.ndarray:
  """Input planes [z0, z1) of a working-grid label volume: each voxel's nearest working label.

  Args:
    labels: labels on the working grid.
    grid: the working Grid.
    z0: first input plane.
    z1: end input plane.

  Returns:
    [z1 - z0, *grid.input_shape[1:]] labels of `labels`' dtype.
  """
  ranges = ((z0, z1), (0, grid.input_shape[1]), (0, grid.input_shape[2]))
  iz, iy, ix = (grid.nearest_working(a, np.arange(*r)) for a, r in enumerate(ranges))
  lo, hi = int(iz.min()), int(iz.max()) + 1
  block = labels.read((lo, 0, 0), (hi, labels.shape[1], labels.shape[2]))
  return block[iz - lo][:, iy][:, :, ix]
