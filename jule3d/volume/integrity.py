"""Identity digests of volumes, same-grid checks, storage read errors as one-line messages."""

import contextlib
import hashlib
import itertools
import json
import math
import re
import weakref
from collections.abc import Iterator

import numpy as np

from jule3d.errors import UserError
from jule3d.volume.core import _SLAB_BYTES, Volume, _first_line, _where
from jule3d.volume.geometry import _close, _fmt

# A volume up to this many voxels is hashed whole by `identity`; a larger one by a lattice of boxes.
_IDENTITY_WHOLE_VOXELS = 1 << 24


_IDENTITY_BOXES = 8  # per axis: 512 boxes


_IDENTITY_EDGE = 16


# Digests of the volumes opened in this process, dropped with each volume (a strong cache would keep
# every volume's tensorstore chunk cache alive).
_IDENTITIES: 'weakref.WeakKeyDictionary[Volume, str]' = weakref.WeakKeyDictionary()


def identity(vol: Volume) -> str:
  """What the volume IS, independent of where it lies: a digest of its content and geometry.

  Hashes the shape, dtype, spacing, affine and voxels (little-endian): every voxel of a volume of
  up to 2^24 voxels, otherwise 8^3 evenly spread boxes of 16^3 voxels (about 2M voxels, one chunk
  read each), so that a copied or moved file, or the same data in another format, is recognised,
  and a different scan at the same path is not. Used where a run or a cache names its data (the
  training fingerprint, the cached working and specimen copies, the stored baselines).

  Args:
    vol: an opened volume (the digest is computed once per Volume object).

  Returns:
    A hex digest (16 characters).
  """
  if vol not in _IDENTITIES:
    _IDENTITIES[vol] = _digest(vol)
  return _IDENTITIES[vol]


def _digest(vol: Volume) -> str:
  h = hashlib.sha256()
  affine = None if vol.affine is None else np.asarray(vol.affine, np.float64).round(9).tolist()
  spacing = [round(float(v), 9) for v in vol.spacing]
  h.update(json.dumps([list(vol.shape), str(vol.dtype), spacing, affine]).encode())
  little = np.dtype(vol.dtype).newbyteorder('<')

  def add(block: np.ndarray) -> None:
    h.update(np.ascontiguousarray(block, dtype=little).tobytes())

  if math.prod(vol.shape) <= _IDENTITY_WHOLE_VOXELS:
    depth = max(1, _IDENTITY_WHOLE_VOXELS // (4 * max(1, vol.shape[1] * vol.shape[2])))
    for _, slab in vol.slabs(depth):
      add(slab)
  else:
    starts = [
      np.linspace(0, max(0, n - _IDENTITY_EDGE), _IDENTITY_BOXES).round().astype(int)
      for n in vol.shape
    ]
    for lo in itertools.product(*starts):
      add(vol.read(lo, [min(a + _IDENTITY_EDGE, n) for a, n in zip(lo, vol.shape, strict=True)]))
  return h.hexdigest()[:16]


def same_grid(a: Volume, b: Volume, atol: float = 1e-3) -> bool:
  """Whether two volumes of one shape lie on the same voxel grid, as far as both are known.

  With both affines: every voxel of `b` maps to within `atol` voxels of the same voxel of `a`
  (inv(A) @ B is the identity within `atol`). Otherwise, where both spacings are known (neither
  geometry is 'default'): the spacings agree within a relative `atol`. A volume with no known
  geometry matches any.

  Args:
    a: a volume.
    b: another volume.
    atol: tolerance, in voxels (relative for spacings).

  Returns:
    True unless the known geometries differ.
  """
  if a.shape != b.shape:
    return False
  if a.affine is not None and b.affine is not None:
    to_a = np.linalg.solve(np.asarray(a.affine, np.float64), np.asarray(b.affine, np.float64))
    return bool(np.allclose(to_a, np.eye(4), rtol=0, atol=atol))
  if 'default' in (a.geometry, b.geometry):
    return True
  return _close(a.spacing, b.spacing, rtol=atol)


def check_same_grid(image: Volume, labels: Volume, name: str = 'data.labels') -> None:
  """Refuses a label volume that is not on the image's voxel grid (`same_grid`).

  A label volume exported from the same scan (e.g. by 3D Slicer) shares its geometry; one that
  carries none (e.g. .npy) is accepted as it is.

  Args:
    image: the image volume.
    labels: the label volume (same shape, checked before).
    name: how the message names the labels, e.g. 'data.labels' (shown as config.data.labels).

  Raises:
    UserError: naming both spacings and origins.
  """
  if same_grid(image, labels):
    return

  def describe(vol):
    origin = (0.0, 0.0, 0.0) if vol.affine is None else vol.affine[:3, 3]
    return f'spacing {_fmt(vol.spacing)}, origin {_fmt(origin)}'

  other = ''
  if (
    image.affine is not None
    and labels.affine is not None
    and _close(image.spacing, labels.spacing)
    and np.allclose(image.affine[:3, 3], labels.affine[:3, 3])
  ):
    other = ' (the same spacing and origin, but other axis directions)'
  raise UserError(
    f"{_where(name, labels.path)} is not on the image's voxel grid: {describe(labels)}, the image "
    f"{image.path!r} {describe(image)}{other}: give labels saved on the image's grid (e.g. "
    'exported from the same scan).'
  )


# tensorstore reports a failed read as a ValueError whose text starts with an absl status code.
_TS_STATUS = re.compile(r'^[A-Z][A-Z_]+: ')


@contextlib.contextmanager
def read_errors(vol: Volume) -> Iterator[None]:
  """Context manager: a tensorstore read failure inside becomes a UserError naming the volume.

  A zarr/N5 chunk that exists but cannot be decoded (a damaged or half-copied file) is found only
  when it is read; wrap the first full pass over a volume in this so that the user gets one line.
  Chunks that are missing altogether are not an error: they read as the store's fill value.

  Args:
    vol: the volume being read.

  Returns:
    A context manager.
  """
  try:
    yield
  except ValueError as e:
    if isinstance(e, UserError) or not _TS_STATUS.match(str(e)):
      raise
    raise UserError(
      f'volume {vol.path!r} could not be read ({_first_line(e)}): a chunk of it is damaged or '
      'unreadable; copy or convert the volume again.'
    ) from None


def validate_volume(vol: Volume) -> None:
  """Checks that a volume can be segmented: no NaN/inf voxel.

  Float volumes are scanned slab by slab (one read pass, memory of one slab). Any size is fine: an
  axis thinner than a patch is padded (jule3d/working.py).

  Args:
    vol: the opened volume.

  Raises:
    UserError: naming the volume and the first slab with a non-finite voxel.
  """
  if vol.dtype.kind != 'f':
    return
  depth = max(1, _SLAB_BYTES // 4 // (vol.shape[1] * vol.shape[2] * vol.dtype.itemsize))
  for z0, slab in vol.slabs(depth):
    bad = ~np.isfinite(slab)
    if bad.any():
      first = tuple(int(i) for i in np.argwhere(bad)[0] + (z0, 0, 0))
      raise UserError(
        f'volume {vol.path!r} has {int(bad.sum())} NaN or infinite voxels in planes '
        f'{z0}..{z0 + slab.shape[0] - 1} of axis 0 (the first at voxel {first}): replace them with '
        'a finite value (e.g. the background intensity) before running jule3d.'
      )
