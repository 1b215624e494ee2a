"""The Volume and what the volume modules share: messages, tensorstore opening, slab helpers."""

import dataclasses
import os
import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorstore as ts

from jule3d.errors import UserError

SUPPORTED = (
  'a zarr (v2 or v3) or N5 array folder, a folder of 2D .tif slices, a folder of one DICOM series, '
  "a tensorstore spec (.json file or inline '{...}'), .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, "
  '.tif, .tiff, .npy'
)


# Where Volume.spacing came from (Volume.geometry).
GEOMETRIES = ('file', 'config', 'override', 'expected', 'default')


# zstd level 1: ~360 MB/s write on 2 cores vs ~200 MB/s at level 3, for a few % more disk.
_COMPRESSOR = {'id': 'blosc', 'cname': 'zstd', 'clevel': 1, 'shuffle': 1}


_CACHE_POOL_BYTES = 128 << 20  # decoded chunks kept per opened volume: overlapping reads hit RAM


_SLAB_BYTES = 256 << 20  # conversion slabs shrink below `chunk` planes only past this size


def _first_line(e: BaseException) -> str:
  line = (str(e).strip().splitlines() or [type(e).__name__])[0]
  # tensorstore appends the whole spec it was given: noise in a one-line message.
  return re.sub(r"\s*\[tensorstore_spec='.*$", '', line)[:300]


def _where(name: str, path: str) -> str:
  shown = path if len(path) <= 120 else path[:117] + '...'
  return f'config.{name} {shown!r}' if '.' in name else f'{name} {shown!r}'


@dataclasses.dataclass(frozen=True, eq=False)
class Volume:
  """An opened 3D volume: a read-only tensorstore plus its metadata.

  Attributes:
    store: read-only 3D TensorStore, every axis starting at 0, axes as stored.
    shape: voxels per array axis.
    dtype: voxel dtype (what `store` reads).
    spacing: voxel edge per array axis: the affine's column lengths when there is an affine.
    affine: 4x4 voxel-to-world matrix, RAS world as NIfTI's (the file's own, exactly; an 'affine'
      attribute of a zarr/N5), or None when the input has none.
    path: the path (or inline spec) the user gave.
    geometry: where `spacing` came from (GEOMETRIES): 'file' (the input's own), 'config' (a spacing
      given for an input without one), 'override' (a given spacing replacing the file's),
      'expected' (expected_spacing, for an input without one) or 'default' (1.0, nothing known).
  """

  store: ts.TensorStore
  shape: tuple[int, int, int]
  dtype: np.dtype
  spacing: tuple[float, float, float]
  affine: np.ndarray | None
  path: str
  geometry: str = 'file'

  def read(self, lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
    """Reads the box [lo, hi).

    Args:
      lo: first voxel per axis.
      hi: one past the last voxel per axis.

    Returns:
      The box as a numpy array of `dtype`.
    """
    lo, hi = tuple(int(v) for v in lo), tuple(int(v) for v in hi)
    inside = zip(lo, hi, self.shape, strict=False)
    if len(lo) != 3 or len(hi) != 3 or not all(0 <= a <= b <= s for a, b, s in inside):
      raise IndexError(f'box [{lo}, {hi}) is not inside the volume of shape {self.shape}')
    return self.store[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].read().result()

  def slabs(self, depth: int) -> Iterator[tuple[int, np.ndarray]]:
    """Iterates over the volume in slabs along axis 0, the next read in flight.

    Args:
      depth: planes per slab (the last slab may be thinner).

    Returns:
      An iterator of (z0, slab) with slab = volume[z0 : z0 + depth].
    """
    if depth < 1:
      raise ValueError(f'slab depth must be >= 1, got {depth}')
    n = self.shape[0]
    yield from read_ahead(range(0, n, depth), lambda z0: self.store[z0 : min(z0 + depth, n)].read())


def read_ahead(keys, start: Callable) -> Iterator[tuple]:
  """(key, array) for each key in order, the next key's read already in flight: the one read-ahead.

  Args:
    keys: what to read, in order (e.g. slab starts).
    start: key -> a started read (a tensorstore future, or anything with .result()).

  Yields:
    (key, the read's result as a numpy array); at most two reads are in flight.
  """
  keys = list(keys)
  future = start(keys[0]) if keys else None
  for i, key in enumerate(keys):
    current, future = future, (start(keys[i + 1]) if i + 1 < len(keys) else None)
    yield key, np.asarray(current.result())


def _file_kvstore(path: str) -> dict:
  return {'driver': 'file', 'path': os.path.abspath(path)}


def _open_spec(spec: dict, where: str) -> ts.TensorStore:
  spec = dict(spec)
  spec.setdefault('context', {})
  if isinstance(spec['context'], dict):
    spec['context'] = {'cache_pool': {'total_bytes_limit': _CACHE_POOL_BYTES}, **spec['context']}
  if spec.get('driver') in ('zarr', 'zarr3', 'n5'):
    # Inputs are not expected to change under a run: trust cached chunks instead of re-statting.
    spec.setdefault('recheck_cached_data', 'open')
  try:
    return ts.open(spec, read=True, write=False).result()
  except Exception as e:  # tensorstore reports every open failure as a ValueError-like error
    if isinstance(e, MemoryError):
      raise
    raise UserError(f'{where} could not be opened ({_first_line(e)}).') from None


def _squeezed_shape(shape: Sequence[int], where: str) -> tuple[int, int, int]:
  full = tuple(int(s) for s in shape)
  shape = full
  while len(shape) > 3 and shape[-1] == 1:
    shape = shape[:-1]
  if len(shape) < 3:
    raise UserError(
      f'{where} is a {len(shape)}D image (shape {full}), jule3d needs a 3D volume: for 2D slices, '
      'put one .tif file per slice in a folder and give the folder.'
    )
  if len(shape) > 3:
    raise UserError(
      f'{where} is a {len(shape)}D image (shape {full}), jule3d needs a 3D volume (extra axes of '
      'size 1 at the end are dropped): save a single channel / time point as a 3D volume.'
    )
  if 0 in shape:
    raise UserError(f'{where} is empty (shape {full}).')
  return shape


def _check_dtype(dtype: np.dtype, where: str) -> np.dtype:
  if dtype.kind not in 'biuf':
    raise UserError(f'{where} has voxels of type {dtype}; expected integers, floats or booleans.')
  return np.dtype(np.uint8) if dtype.kind == 'b' else dtype.newbyteorder('=')


@dataclasses.dataclass(frozen=True)
class _Source:
  """A non-chunked input, inspected from its header only."""

  shape: tuple[int, int, int]
  dtype: np.dtype  # what is written (native byte order, bool -> uint8)
  spacing: tuple[float, float, float] | None
  affine: np.ndarray | None
  axis: int  # slabs run along this axis: the slowest-varying on disk
  slabs: Callable[[int], Iterator[np.ndarray]]  # depth -> successive slabs along `axis`
  files: tuple[str, ...]  # what the cache key stamps


def _native(slab, dtype: np.dtype) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(slab).astype(dtype, copy=False))


def _along(axis: int, lo: int, hi: int) -> tuple[slice, ...]:
  index = [slice(None)] * 3
  index[axis] = slice(lo, hi)
  return tuple(index)


def _library_error(where: str, what: str, e: Exception) -> UserError:
  if isinstance(e, PermissionError):
    return UserError(f'{where}: permission denied, this file cannot be read by you.')
  return UserError(
    f'{where} is not a readable {what} (damaged or not that format: {_first_line(e)}).'
  )
