"""Outside-the-specimen masking (`config.patches.mask_outside`, an extension; off in the paper configs).

Why: a patch whose centre lies near the specimen's surface also holds the air around the specimen.
That air is the strongest signal in such a patch, so the period-0 clusters of raw patches, the CNN
trained on them and the segmentation's k-means all spend a cluster on "how much outside air is in
the patch": the segments follow the specimen's rim instead of the tissue (README, Results).

Which voxels are outside: not foreground (method §1 threshold), and in or next to a coarse block
(edge `block` voxels) of the background that is connected to the volume's faces. A block counts as
specimen when any of its voxels is foreground, so holes narrower than a block that open onto the
surface (alveoli cut by it) do not let the outside in; enclosed air (alveoli, airways) is never
outside. That band reaches up to two blocks into the specimen, so the pores open onto the surface
are outside too: 4.3 % / 5.3 % of the phantom's specimen voxels (96^3 / 128^3, seed 0).

The envelope (`config.segment.fill_envelope`, the recommended method): the band voxels that a
closing of the foreground by a ball of radius `block` fills, voxel by voxel, are inside it. They are
labelled by the segmentation's fill (the label of the nearest segmented voxel), so a pore cut by the
surface belongs to its tissue, as annotators draw regions; the patches, their centres and the
masking keep the band rule. On the phantom the specimen voxels left unlabelled fall to 1.9 % / 3.0 %
with no outside air taken in (`bench/specimen_surface.py`). Centring patches on those pores as
well (training and k-means) made two of six phantom runs worse (NMI 0.645 and 0.594, run seed 2:
worse training clusters, two tissues merged); filling them leaves the learned part as it was.

What goes there (`config.patches.outside_fill`):
- 'mirror' (the recommended method): the specimen mirrored across its surface. An outside voxel
  takes the value of the point mirrored through its nearest inside voxel, out to half a patch edge
  (farther, no patch centred in the specimen sees it: the mean below). A patch at the rim then sees
  the tissue's own texture and level on both sides, so a texture keeps its energy up to the surface.
  Per voxel on the phantom (k-means K = 3 on the pooled fine energy of jule3d/descriptors.py, every
  annotated voxel, phantom seed 0): 0.734 / 0.781 at 96^3 / 128^3 with this fill, 0.530 / 0.606
  with the mean fill, 0.647 / 0.709 unmasked.
- 'mean': the mean intensity of the blocks away from the outside (the specimen's own mean), so an
  outside voxel normalises to about 0. A constant reads as smooth tissue: the rim of a textured
  specimen took the smooth region's label.

What it changes: the patch CONTENT only (training patches, segmentation features). Foreground, the
sampled centres, the stride grid, the baselines and the figures still use the image as it is.
The masked copy is written once, slab by slab, as a zarr under WORKDIR/cache/ (memory: one slab
plus the coarse block grid, 1/block^3 of the volume; with 'mirror' the slab also carries a patch
edge of planes on each side and a Euclidean distance transform of it, about 40 bytes a voxel). The
envelope keeps one bit a voxel for the whole volume (lung C: 26 MB, cached under WORKDIR/cache)
and costs a second pass, two distance transforms per slab.
"""

import dataclasses
import hashlib
import json
import os

import numpy as np
from absl import logging
from scipy import ndimage

from jule3d import files, patches, volume
from jule3d.errors import UserError

_VERSION = 1  # part of the cache key: bump it when the mask or the fill changes


def _slab_depth(block: int, plane_voxels: int) -> int:
  # Whole blocks per slab, about 64 MiB of float64 sums per slab at most.
  planes = max(1, (64 << 20) // 8 // max(1, plane_voxels))
  return block * max(1, planes // block)


def _block_view(a: np.ndarray, block: int, fill) -> np.ndarray:
  # [Z, Y, X] -> [Z/b, b, Y/b, b, X/b, b], padded with `fill` to whole blocks.
  pad = [(0, (-n) % block) for n in a.shape]
  a = np.pad(a, pad, constant_values=fill)
  z, y, x = (n // block for n in a.shape)
  return a.reshape(z, block, y, block, x, block)


def coarse_outside(vol, threshold: float, direction: str, block: int) -> tuple[np.ndarray, float]:
  """The coarse outside region and the fill value, in one streaming pass over the volume.

  Args:
    vol: a jule3d.volume.Volume.
    threshold: foreground threshold.
    direction: 'above' or 'below'.
    block: coarse block edge in voxels (>= 1).

  Returns:
    (near, fill): bool [ceil(Z/b), ceil(Y/b), ceil(X/b)], True for blocks of the face-connected
    background and their 26 neighbours; the mean intensity of the other blocks (of all blocks when
    none is left).
  """
  depth = _slab_depth(block, vol.shape[1] * vol.shape[2])
  fg_rows, sum_rows = [], []
  for _, slab in vol.slabs(depth):
    fg = patches.foreground(slab, threshold, direction)
    fg_rows.append(_block_view(fg, block, False).any(axis=(1, 3, 5)))
    sum_rows.append(_block_view(slab.astype(np.float64), block, 0.0).sum(axis=(1, 3, 5)))
  specimen = np.concatenate(fg_rows)
  sums = np.concatenate(sum_rows)
  # Voxels per block: `block` on every axis but the last block of an axis, which may be partial.
  edges = [np.minimum(block, n - block * np.arange(-(-n // block))) for n in vol.shape]
  counts = edges[0][:, None, None] * edges[1][None, :, None] * edges[2][None, None, :]
  components, _ = ndimage.label(~specimen)
  faces = np.concatenate(
    [components[i].ravel() for i in (np.s_[0], np.s_[-1], np.s_[:, 0], np.s_[:, -1])]
    + [components[:, :, 0].ravel(), components[:, :, -1].ravel()]
  )
  outside = np.isin(components, np.unique(faces[faces > 0]))
  near = ndimage.binary_dilation(outside, np.ones((3, 3, 3), bool)) if outside.any() else outside
  keep = ~near if (~near).any() else np.ones_like(near)
  fill = float(sums[keep].sum() / max(int(counts[keep].sum()), 1))
  return near, fill


def _band(near: np.ndarray, block: int, z, y, x) -> np.ndarray:
  """The coarse band `near` at the voxels (z x y x x): [len(z), len(y), len(x)] bool."""
  return near[np.ix_(np.asarray(z) // block, np.asarray(y) // block, np.asarray(x) // block)]


def _closing_rows(vol, threshold, direction, near: np.ndarray, block: int) -> np.ndarray:
  """The voxels near the outside that a morphological closing leaves open, bit-packed along x.

  A non-foreground voxel of the coarse band (`near`) is outside when a ball of radius `block`
  through it fits in the background: the complement of the foreground closed by that ball (dilated
  then eroded, by Euclidean distance transforms). Holes onto the surface narrower than the ball stay
  inside, voxel for voxel; wider air pockets of the band stay outside, as with the blocks alone.
  Beyond the volume's faces is background. Streamed in slabs with a halo of two radii (the
  closing's reach), so the slabs give the same voxels as one pass over the whole volume.

  Returns:
    uint8 [Z, Y, ceil(X / 8)]: np.packbits of the outside voxels along the last axis.
  """
  n = vol.shape[0]
  r, halo = block, 2 * block
  depth = _slab_depth(block, vol.shape[1] * vol.shape[2])
  rows = []

  def read(z0):
    return vol.store[max(0, z0 - halo) : min(n, z0 + depth + halo)].read()

  for z0, ext in volume.read_ahead(range(0, n, depth), read):
    lo, hi = max(0, z0 - halo), min(n, z0 + depth)
    band = _band(near, block, np.arange(z0, hi), *map(np.arange, ext.shape[1:]))
    if not band.any():
      rows.append(np.packbits(band, axis=-1))
      continue
    fg = patches.foreground(ext, threshold, direction)
    # Background beyond the volume's faces (not beyond a slab's halo, which is real data).
    pad = [
      (r + 1 if lo == 0 else 0, r + 1 if lo + len(ext) == n else 0),
      (r + 1,) * 2,
      (r + 1,) * 2,
    ]
    fg = np.pad(fg, pad)
    dilated = ndimage.distance_transform_edt(~fg) <= r
    closed = ndimage.distance_transform_edt(dilated) > r
    core = closed[pad[0][0] + z0 - lo :][: hi - z0, r + 1 : -(r + 1), r + 1 : -(r + 1)]
    rows.append(np.packbits(band & ~core, axis=-1))
  return (
    np.concatenate(rows) if rows else np.zeros((0, vol.shape[1], -(-vol.shape[2] // 8)), np.uint8)
  )


@dataclasses.dataclass(frozen=True)
class Interior:
  """Everything inside the specimen's outer surface: foreground plus the air it encloses.

  The segmentation domain of `config.patches.domain = 'specimen'` (a region segmentation, the way
  annotators draw tissue regions: an alveolus of normal tissue is normal tissue). A voxel is inside
  when it is foreground or lies outside every coarse block near the face-connected background
  (`coarse_outside`): the complement of the voxels that `masked_volume` fills.

  The envelope (`config.segment.fill_envelope`, with `open_bits`) adds the band's voxels that a
  closing of the foreground by a ball of radius `block` fills (`_closing_rows`): the pores open onto
  the surface. They get labels from the fill; no patch is centred there.
  """

  near: np.ndarray  # bool [ceil(Z/b), ceil(Y/b), ceil(X/b)] from coarse_outside
  block: int
  fill: float  # the specimen's mean (coarse_outside), what masked_volume writes outside
  open_bits: np.ndarray | None = None  # uint8 [Z, Y, ceil(X/8)] from _closing_rows

  def inside(
    self, fg: np.ndarray, z: np.ndarray, y: np.ndarray, x: np.ndarray, envelope: bool = False
  ) -> np.ndarray:
    """The domain at the voxels (z x y x x) whose foreground test is `fg` [len(z), len(y), len(x)].

    With `envelope` (and `open_bits`), the envelope instead: the voxels that are not open.
    """
    z, y, x = (np.asarray(a) for a in (z, y, x))
    if envelope and self.open_bits is not None:
      return fg | ~np.unpackbits(self.open_bits[np.ix_(z, y)], axis=-1).astype(bool)[..., x]
    return fg | ~_band(self.near, self.block, z, y, x)


def interior(
  vol, threshold: float, direction: str, block: int, envelope: bool = False, cache_dir=None
) -> Interior:
  """The specimen's interior (Interior) of a volume.

  Args:
    vol: a jule3d.volume.Volume.
    threshold: foreground threshold.
    direction: 'above' or 'below'.
    block: coarse block edge, and the closing's radius (config.patches.outside_block).
    envelope: also find the envelope (`_closing_rows`: a second pass over the volume, 1 bit a
      voxel kept), for config.segment.fill_envelope.
    cache_dir: where the envelope's bits are kept once computed (WORKDIR/cache), or None.

  Returns:
    The Interior.

  Raises:
    UserError: the cache folder cannot be written.
  """
  near, fill = coarse_outside(vol, threshold, direction, block)
  bits = None
  if envelope:
    path = None
    if cache_dir is not None:
      key = _cache_key(vol, threshold, direction, block)
      path = os.path.join(cache_dir, f'specimen-{key}-envelope.npy')
    if path is not None and os.path.exists(path):
      bits = np.load(path)
    else:
      bits = _closing_rows(vol, threshold, direction, near, block)
      if path is not None:
        try:
          os.makedirs(cache_dir, exist_ok=True)
          files.write_npy_atomic(path, bits)
        except OSError as e:
          raise UserError(
            f'the specimen envelope cannot be written in {cache_dir!r} ({e.strerror or e}): free '
            'space there or choose another --workdir.'
          ) from None
  return Interior(near=near, block=int(block), fill=fill, open_bits=bits)


def _cache_key(vol, threshold: float, direction: str, block: int) -> str:
  # Named by the volume's content (volume.identity), not its path: a moved workdir reuses it.
  key = [_VERSION, volume.identity(vol), threshold, direction, block]
  return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def _mirrored(values: np.ndarray, outside: np.ndarray, core: slice, reach: int, fill) -> np.ndarray:
  """values[core] with its outside voxels replaced by the specimen mirrored across its surface.

  An outside voxel x whose nearest inside voxel i (Euclidean) lies within reach / 2 takes the value
  at 2i - x, the point mirrored through i, when that point is inside the specimen and `values`;
  otherwise the value at i. Farther voxels, which no patch centred in the domain sees, take `fill`.
  A texture keeps its statistics up to the surface (a constant would read as smooth tissue there).

  Args:
    values: the slab with up to `reach` planes of halo on each side (fewer at the volume's faces).
    outside: bool, same shape: the voxels to fill.
    core: the slab's own planes within `values`.
    reach: the patch edge: with that halo, every i and 2i - x a patch can see are in `values`.
    fill: the value of the far voxels.

  Returns:
    The core planes, filled (dtype of `values`).
  """
  out = values[core].copy()
  target = outside[core]
  if not target.any():
    return out
  if outside.all():
    out[target] = fill
    return out
  dist, nearest = ndimage.distance_transform_edt(outside, return_indices=True)
  x = np.nonzero(target)
  x = (x[0] + core.start, x[1], x[2])
  i = tuple(nearest[a][x] for a in range(3))
  del nearest
  r = tuple(2 * i[a] - x[a] for a in range(3))
  fits = np.all([(r[a] >= 0) & (r[a] < values.shape[a]) for a in range(3)], axis=0)
  r = tuple(np.where(fits, r[a], i[a]) for a in range(3))
  mirror = fits & ~outside[r]
  v = np.where(mirror, values[r], values[i])
  out[target] = np.where(dist[x] <= reach / 2, v, fill)
  return out


def masked_volume(
  vol,
  threshold: float,
  direction: str,
  block: int,
  cache_dir: str,
  chunk: int = 64,
  known: Interior | None = None,
  fill_mode: str = 'mean',
  reach: int = 0,
) -> 'volume.Volume':
  """The volume with its outside replaced (the specimen mirrored, or its mean), cached as a zarr.

  Args:
    vol: the input Volume.
    threshold: foreground threshold.
    direction: 'above' or 'below'.
    block: coarse block edge (config.patches.outside_block).
    cache_dir: folder for the copy (WORKDIR/cache).
    chunk: zarr chunk edge.
    known: the same volume's Interior (same threshold and block), if already computed: its
      outside and fill are reused instead of another pass over the volume.
    fill_mode: 'mirror' (the specimen mirrored across its surface, `_mirrored`) or 'mean' (the
      specimen's mean everywhere outside).
    reach: with 'mirror', the patch edge (how far from the surface a patch sees).

  Returns:
    The masked copy, opened (same shape, dtype, spacing and affine).

  Raises:
    UserError: the cache folder cannot be written.
  """
  mirror = fill_mode == 'mirror'
  key = _cache_key(vol, threshold, direction, block) + (f'-m{reach}' if mirror else '')
  final = os.path.join(cache_dir, f'specimen-{key}.zarr')

  def slabs():
    inner = known if known else interior(vol, threshold, direction, block)
    near, fill = inner.near, inner.fill
    info = np.iinfo(vol.dtype) if vol.dtype.kind in 'iu' else None
    value = np.clip(np.rint(fill), info.min, info.max) if info is not None else fill
    logging.info(
      'masking the outside of the specimen (%.1f%% of the volume, blocks of %d^3) with %s: %s',
      100.0 * near.mean(),
      block,
      f'its mirror image (reach {reach})' if mirror else f'{value:.6g}',
      final,
    )
    n = vol.shape[0]
    depth = _slab_depth(block, vol.shape[1] * vol.shape[2])
    halo = reach if mirror else 0  # planes read beyond the slab on each side
    if mirror:
      depth = max(depth, block * -(-2 * reach // block))  # the halo at most doubles what is read

    def read(z0):  # the slab and its halo, read ahead
      return vol.store[max(0, z0 - halo) : min(n, z0 + depth + halo)].read()

    for z0, ext in volume.read_ahead(range(0, n, depth), read):
      lo = max(0, z0 - halo)
      fg = patches.foreground(ext, threshold, direction)
      outside = ~inner.inside(fg, np.arange(lo, lo + len(ext)), *map(np.arange, ext.shape[1:]))
      if mirror:
        yield z0, _mirrored(ext, outside, slice(z0 - lo, min(z0 + depth, n) - lo), reach, value)
      else:
        slab = np.array(ext)
        slab[outside] = value
        yield z0, slab

  what = 'specimen-masked copy of config.data.path'
  return volume.derived_copy(
    final, vol.shape, vol.dtype, vol.spacing, vol.affine, chunk, slabs, what
  )
