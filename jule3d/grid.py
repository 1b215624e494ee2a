"""The stride grid of segmentation (method §5): where grid patches go and where their labels land.

Grid point i of an axis is the voxel w//2 + i*s (w the odd patch edge, s the stride): the first
centre whose patch lies inside the volume, then every s voxels while the patch still fits. Every
piece of the pipeline that needs the grid asks this module: its points per axis (`axes`, `shape_of`),
the domain's grid centres (`centres`), a centre's lattice index (`index`) and axis-0 grid plane, the
resumable feature parts (`parts`, `part_planes`) and the s^3 block each label paints (`paint_slab`).
"""

import numpy as np

from jule3d import patches
from jule3d.errors import UserError


def shape_of(shape: tuple[int, ...], patch_size: int, stride: int) -> tuple[int, ...]:
  """Grid points per axis of the stride grid (the lengths of `axes`), 0 where none fits."""
  h = patch_size // 2
  return tuple(max(0, -(-(int(s) - 2 * h) // stride)) for s in shape)


def axes(shape: tuple[int, ...], patch_size: int, stride: int) -> list[np.ndarray]:
  """Candidate grid coordinates per axis: every `stride` voxels from the first valid centre.

  Args:
    shape: volume shape.
    patch_size: odd patch edge.
    stride: grid step s.

  Returns:
    One int array per axis (may be empty when the volume is smaller than a patch).
  """
  lo, hi = patches.centre_bounds(shape, patch_size)
  return [np.arange(a, b, stride, dtype=np.int64) for a, b in zip(lo, hi, strict=True)]


def centres(
  volume,
  patch_size: int,
  stride: int,
  threshold: float,
  direction: str,
  slab_depth: int = 64,
  interior=None,
) -> np.ndarray:
  """The stride-s grid of segmentation centres (method §5): foreground centres, patch inside.

  Args:
    volume: a jule3d.volume.Volume.
    patch_size: odd patch edge.
    stride: grid step s.
    threshold: foreground threshold.
    direction: 'above' or 'below'.
    slab_depth: grid planes of axis 0 read at once.
    interior: the specimen's Interior for the 'specimen' domain (patches.in_domain); None: foreground.

  Returns:
    int32 array [M, 3] in raster order (axis 0 slowest).
  """
  patches.check_fits(volume.shape, patch_size)
  gz, gy, gx = axes(volume.shape, patch_size, stride)
  found = []
  for i0 in range(0, gz.size, slab_depth):
    zs = gz[i0 : i0 + slab_depth]
    # Strided read: only the grid voxels themselves.
    vals = (
      volume.store[
        int(zs[0]) : int(zs[-1]) + 1 : stride,
        int(gy[0]) : int(gy[-1]) + 1 : stride,
        int(gx[0]) : int(gx[-1]) + 1 : stride,
      ]
      .read()
      .result()
    )
    iz, iy, ix = np.nonzero(patches.in_domain(vals, threshold, direction, interior, (zs, gy, gx)))
    found.append(np.stack([zs[iz], gy[iy], gx[ix]], axis=1))
  if not found:
    return np.zeros((0, 3), dtype=np.int32)
  return np.concatenate(found).astype(np.int32)


def require(count: int, num_segments: int, stride: int) -> None:
  """Raises UserError when the stride grid has fewer foreground patches than segments K.

  Args:
    count: grid patches with a foreground centre.
    num_segments: K.
    stride: grid stride (for the message).
  """
  if count < num_segments:
    raise UserError(
      f'only {count} grid patches (stride {stride}) have a foreground centre, fewer than '
      f'config.segment.num_segments = {num_segments}: lower the stride or K, or check the threshold.'
    )


def index(centres: np.ndarray, patch_size: int, stride: int) -> np.ndarray:
  """Lattice index (int64 [M, 3]) of grid centres: (centre - w//2) // s per axis."""
  return (np.asarray(centres).astype(np.int64) - patch_size // 2) // stride


def parts(centres: np.ndarray, patch_size: int, stride: int, planes_per_part: int) -> np.ndarray:
  """Feature part of every centre: its axis-0 grid plane // planes_per_part (int64 [M]).

  Parts are runs of whole grid planes, so that they line up with the dense path's blocks (which
  start at grid plane 0) when planes_per_part is a multiple of the block's planes.
  """
  return index(centres, patch_size, stride)[:, 0] // planes_per_part


def part_planes(requested: int, patch_size: int, stride: int, multiple: int = 1) -> int:
  """Grid planes per resumable feature part (config.segment.part_planes; 0 = the rule below).

  The rule: at least 8 patch edges along axis 0, so that re-reading a patch's halo per part costs
  at most ~12%; rounded up to a multiple of `multiple` (the dense path's block planes, so that no
  block is computed twice).
  """
  planes = requested or max(8, -(-8 * patch_size // stride))
  return -(-planes // multiple) * multiple


def paint_slab(
  z0: int, z1: int, shape, centres: np.ndarray, labels: np.ndarray, stride: int
) -> np.ndarray:
  """The label slab [z0, z1) of the output: each centre's label fills its s^3 block (method §5).

  Args:
    z0: first plane.
    z1: end plane.
    shape: volume shape.
    centres: [M, 3] grid centres sorted by axis 0.
    labels: [M] labels 1..K.
    stride: s (block edge).

  Returns:
    uint8 [z1 - z0, Y, X]; uncovered voxels 0.
  """
  out = np.zeros((z1 - z0,) + tuple(shape[1:]), np.uint8)
  lo = stride // 2
  first = centres[:, 0] - lo  # first plane of each block; centres are sorted by axis 0
  sel = slice(*np.searchsorted(first, [z0 - stride + 1, z1]))
  c, lab = centres[sel], labels[sel]
  # One vectorised assignment per offset inside the block (s^3 of them), not a loop over centres.
  # Blocks stay inside the volume on axes 1 and 2 because stride // 2 <= patch_size // 2.
  for dz in range(stride):
    z = c[:, 0] - lo + dz
    keep = (z >= z0) & (z < z1)
    zk, yk, xk, lk = z[keep] - z0, c[keep, 1] - lo, c[keep, 2] - lo, lab[keep]
    for dy in range(stride):
      for dx in range(stride):
        out[zk, yk + dy, xk + dx] = lk
  return out
