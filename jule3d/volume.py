"""Volumes in and out (SPEC 1): open any supported format through tensorstore, convert once, write.

`open_volume` accepts
  * a zarr v2 / zarr v3 / N5 array folder, or a tensorstore JSON spec (a `.json` file, or inline
    text starting with '{'): opened IN PLACE, read-only, never copied. Spacing comes from the
    attribute 'spacing' (N5 also 'resolution' / 'pixelResolution'); an 'affine' attribute is kept.
    Chunks missing from the store read as the fill value (tensorstore's rule), without an error.
  * `.nii` / `.nii.gz`, a multi-page `.tif` / `.tiff`, a folder of 2D TIFF slices (one per index of
    axis 0, natural sort: slice2 before slice10), `.npy`: converted ONCE into a chunked blosc/zstd
    zarr v2 under `cache_dir`, slab by slab, so a volume larger than RAM converts. The cache name
    hashes the absolute path, size and mtime of the source (an edited file is converted again); the
    copy is written under a temporary name and renamed, so the cache never holds a partial volume.
    Superseded copies are not deleted (a running job may still read them): delete them by hand.

How each converted format is streamed (memory: a few slabs of `chunk` planes):
  * NIfTI: the header is parsed by nibabel, the voxels are read sequentially along the last array
    axis (the slowest on disk), so even a `.nii.gz` streams in one pass instead of loading whole;
    scl_slope / scl_inter are applied as nibabel does. Spacing = header zooms; the affine is kept.
  * multi-page TIFF: memory-mapped when uncompressed and contiguous, else read page by page; other
    layouts (e.g. one compressed page holding the whole volume) are loaded whole. ImageJ files give
    their spacing (z from 'spacing', y/x from the resolution tags); other TIFFs give 1.0.
  * TIFF folder: one file per plane; every file's header is checked before anything is converted.
  * `.npy`: memory-mapped (`mmap_mode='r'`), read along its slowest axis.

Axes are the array axes as stored (NIfTI: i, j, k). Integer and float dtypes are kept as they are
(CT int16 with negative values included); bool becomes uint8. A 4D+ image whose extra trailing axes
all have size 1 is accepted as 3D. Stores are translated so that every axis starts at 0.

Writers: `save_zarr` (an in-memory array), `create_zarr` + `commit_zarr` or the `zarr_writer`
context manager (outputs streamed slab by slab), `write_nifti`. All are atomic: the final name never
holds a partial volume. Outputs carry 'spacing' (and 'affine') attributes that `open_volume` reads.
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorstore as ts
from absl import logging

from jule3d.errors import UserError

SUPPORTED = (
  'a zarr (v2 or v3) or N5 array folder, a folder of 2D .tif slices, a tensorstore spec '
  "(.json file or inline '{...}'), .nii, .nii.gz, .tif, .tiff, .npy"
)
_CACHE_VERSION = 1  # part of the cache key: bump it when the converted layout changes
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
    spacing: voxel edge per array axis (file metadata, override, or 1.0).
    affine: 4x4 voxel-to-world matrix (NIfTI, or an 'affine' attribute), consistent with `spacing`.
    path: the path (or inline spec) the user gave.
  """

  store: ts.TensorStore
  shape: tuple[int, int, int]
  dtype: np.dtype
  spacing: tuple[float, float, float]
  affine: np.ndarray | None
  path: str

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
    future = self.store[0 : min(depth, n)].read()
    for z0 in range(0, n, depth):
      z1 = min(z0 + depth, n)
      current, future = future, (self.store[z1 : min(z1 + depth, n)].read() if z1 < n else None)
      yield z0, current.result()


# --- Opening --------------------------------------------------------------------------------------


def open_volume(
  path: str,
  *,
  cache_dir: str | None = None,
  spacing: Sequence[float] = (),
  chunk: int = 64,
  name: str = 'volume',
) -> Volume:
  """Opens a volume in any supported format (module docstring), converting it once if needed.

  Args:
    path: a file or folder path, or an inline tensorstore JSON spec.
    cache_dir: where converted copies live (default: a per-user folder under the system temp dir).
    spacing: voxel spacing override, one positive number per array axis; () reads it from the file.
    chunk: chunk edge of converted copies.
    name: how error messages name the input, e.g. 'data.path' (shown as config.data.path).

  Returns:
    The opened Volume.

  Raises:
    UserError: missing, unreadable, unsupported, damaged or non-3D input, or a bad override; raised
      before any conversion, except for damage found only while converting (nothing is left behind).
  """
  path = os.fspath(path) if not isinstance(path, str) else path
  where = _where(name, path)
  field = 'config.data.spacing = ' if '.' in name else 'spacing override '
  override = _check_spacing(spacing, f'{field}{tuple(spacing)!r} (for {where})')
  if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
    raise UserError(f'config.data.cache_chunk = {chunk!r}: expected a positive integer (e.g. 64).')
  kind = _kind(path, where)
  if kind in ('zarr', 'zarr3', 'n5', 'json'):
    store, attrs, rank = _open_in_place(kind, path, where)
    store = _as_3d(store, where)
    file_spacing, affine = _attr_metadata(attrs, rank, where, need_spacing=override is None)
  else:
    source = _SOURCES[kind](path, where)
    final = _cached_copy(source, kind, path, cache_dir, chunk, where)
    store = _open_spec({'driver': 'zarr', 'kvstore': _file_kvstore(final)}, where)
    file_spacing, affine = source.spacing, source.affine
  final_spacing = override or file_spacing or (1.0, 1.0, 1.0)
  if affine is not None:
    affine = _rescale_affine(affine, final_spacing)
  return Volume(
    store=store,
    shape=tuple(int(s) for s in store.shape),
    dtype=np.dtype(store.dtype.numpy_dtype),
    spacing=tuple(float(s) for s in final_spacing),
    affine=affine,
    path=path,
  )


def _check_spacing(spacing, what: str, allow_empty: bool = True) -> tuple[float, ...] | None:
  try:
    values = tuple(float(s) for s in spacing)
  except (TypeError, ValueError):
    values = None
  if values == () and allow_empty:
    return None
  if values is None or len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
    alternative = ', or () to read it from the file' if allow_empty else ''
    raise UserError(f'{what}: expected 3 positive numbers (one per array axis){alternative}.')
  return values


def _kind(path: str, where: str) -> str:
  if path.lstrip().startswith('{'):
    return 'json'
  if not path:
    raise UserError(f'{where}: no path given; expected {SUPPORTED}.')
  if not os.path.exists(path):
    raise UserError(f'{where}: no such file or folder (looked in {os.path.abspath(path)!r}).')
  if os.path.isdir(path):
    if not os.access(path, os.R_OK | os.X_OK):
      raise UserError(f'{where}: permission denied, this folder cannot be read by you.')
    return _folder_kind(path, where)
  lower = path.lower()
  ext = next(
    (e for e in ('.nii.gz', '.nii', '.tiff', '.tif', '.npy', '.json') if lower.endswith(e)), ''
  )
  if not ext:
    raise UserError(
      f'{where}: unsupported file type {os.path.splitext(path)[1] or "(no extension)"!r}; '
      f'expected {SUPPORTED}.'
    )
  if not os.access(path, os.R_OK):
    raise UserError(f'{where}: permission denied, this file cannot be read by you.')
  return {'.nii.gz': 'nifti', '.nii': 'nifti', '.tiff': 'tiff', '.tif': 'tiff'}.get(ext, ext[1:])


def _folder_kind(path: str, where: str) -> str:
  group = f'{where} is a zarr/N5 group, not an array: give the folder of one array inside it'
  if os.path.exists(os.path.join(path, '.zarray')):
    return 'zarr'
  meta = os.path.join(path, 'zarr.json')
  if os.path.exists(meta):
    if _read_json(meta, where).get('node_type') == 'group':
      raise UserError(f'{group} (for OME-Zarr, the full resolution is usually {path}/0).')
    return 'zarr3'
  meta = os.path.join(path, 'attributes.json')
  if os.path.exists(meta):
    if 'dimensions' not in _read_json(meta, where):
      raise UserError(f'{group} (an N5 dataset has "dimensions" in its attributes.json).')
    return 'n5'
  if os.path.exists(os.path.join(path, '.zgroup')):
    raise UserError(f'{group} (for OME-Zarr, the full resolution is usually {path}/0).')
  if _tiff_files(path):
    return 'tiff_dir'
  raise UserError(
    f'{where} is a folder with neither zarr/N5 metadata (.zarray, zarr.json, attributes.json) nor '
    f'.tif/.tiff slices; expected {SUPPORTED}.'
  )


def _read_json(path: str, where: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'{where}: {path!r} is not readable JSON ({_first_line(e)}).') from None


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


def _open_in_place(kind: str, path: str, where: str) -> tuple[ts.TensorStore, dict, int]:
  if kind == 'json':
    text = path
    if not path.lstrip().startswith('{'):
      try:
        with open(path) as f:
          text = f.read()
      except OSError as e:
        raise UserError(f'{where} cannot be read ({e.strerror}).') from None
    try:
      spec = json.loads(text)
    except ValueError as e:
      raise UserError(f'{where} is not valid JSON ({_first_line(e)}).') from None
    if not isinstance(spec, dict):
      raise UserError(f'{where}: expected a tensorstore spec (a JSON object with a "driver").')
    for key in ('create', 'delete_existing'):  # inputs are opened read-only, never (re)created
      spec.pop(key, None)
  else:
    spec = {'driver': kind, 'kvstore': _file_kvstore(path)}
  store = _open_spec(spec, where)
  return store, _store_attrs(store, spec.get('driver')), store.rank


def _store_attrs(store: ts.TensorStore, driver: str | None) -> dict:
  # Attributes live beside the array metadata; read them through the store's own kvstore so that a
  # JSON spec pointing at any backend works, not only local files.
  key = {'zarr': '.zattrs', 'zarr3': 'zarr.json', 'n5': 'attributes.json'}.get(driver or '')
  try:
    kv = store.kvstore
    if key is None or kv is None:
      return {}
    result = kv.read(key).result()
    attrs = json.loads(result.value) if result.state == 'value' else {}
  except (ValueError, RuntimeError):
    return {}
  if driver == 'zarr3':
    attrs = attrs.get('attributes', {})
  return attrs if isinstance(attrs, dict) else {}


def _attr_metadata(attrs: dict, rank: int, where: str, need_spacing: bool):
  spacing = None
  for key in ('spacing', 'resolution', 'pixelResolution') if need_spacing else ():
    value = attrs.get(key)
    if isinstance(value, dict):  # N5 viewer style: {"dimensions": [...], "unit": "um"}
      value = value.get('dimensions')
    if value is None:
      continue
    if isinstance(value, list) and len(value) == rank > 3:  # a squeezed trailing axis
      value = value[:3]
    spacing = _check_spacing(value, f'{where}: attribute {key!r} = {value!r}', allow_empty=False)
    break
  affine = attrs.get('affine')
  if affine is not None:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
      raise UserError(f'{where}: attribute "affine" is not a 4x4 matrix of numbers.')
  return spacing, affine


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


def _as_3d(store: ts.TensorStore, where: str) -> ts.TensorStore:
  domain = store.domain
  if not all(math.isfinite(v) for v in (*domain.inclusive_min, *domain.exclusive_max)):
    raise UserError(f'{where} has an unbounded domain {domain}: give a spec with a finite shape.')
  store = store.translate_to[(0,) * store.rank]
  _squeezed_shape(store.shape, where)
  while store.rank > 3:
    store = store[..., 0]
  dtype = store.dtype
  if dtype == ts.bool:
    return ts.cast(store, ts.uint8)
  if dtype.name.startswith(('bfloat16', 'float8')):
    return ts.cast(store, ts.float32)
  _check_dtype(np.dtype(dtype.numpy_dtype), where)
  return store


def _check_dtype(dtype: np.dtype, where: str) -> np.dtype:
  if dtype.kind not in 'biuf':
    raise UserError(f'{where} has voxels of type {dtype}; expected integers, floats or booleans.')
  return np.dtype(np.uint8) if dtype.kind == 'b' else dtype.newbyteorder('=')


def _rescale_affine(affine: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
  # Keep the direction and origin, make the column lengths the (possibly overridden) spacing.
  affine = np.array(affine, dtype=np.float64)
  norms = np.linalg.norm(affine[:3, :3], axis=0)
  if np.all(norms > 0):
    affine[:3, :3] *= np.asarray(spacing, dtype=np.float64) / norms
  return affine


# --- Converted formats ----------------------------------------------------------------------------


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


def _raw_slabs(path, offset, raw, shape, axis, where, opener=open, scale=None, out=None):
  """Slabs of a C-order (axis 0) or Fortran-order (axis 2) array stored raw at `offset`.

  Plain sequential reads, not a memory map: the process's memory stays at one slab however large
  the file, and a compressed stream (.nii.gz) needs a single pass.
  """
  plane = math.prod(shape) // shape[axis] * raw.itemsize
  if opener is open and os.path.getsize(path) < offset + plane * shape[axis]:
    raise UserError(
      f'{where} is truncated: {os.path.getsize(path)} bytes, but its header describes '
      f'{offset + plane * shape[axis]} (shape {shape}, {raw}).'
    )

  def slabs(depth):
    with opener(path, 'rb') as f:
      f.seek(offset)
      for lo in range(0, shape[axis], depth):
        n = min(depth, shape[axis] - lo)
        buf = f.read(plane * n)
        if len(buf) < plane * n:
          raise EOFError(f'the file ends before plane {lo + len(buf) // plane} of {shape[axis]}')
        size = (n, *shape[1:]) if axis == 0 else (*shape[:2], n)
        slab = np.frombuffer(buf, raw).reshape(size, order='C' if axis == 0 else 'F')
        yield _native(slab if scale is None else scale(slab), out or raw)

  return slabs


def _npy_source(path: str, where: str) -> _Source:
  fmt = np.lib.format
  try:
    with open(path, 'rb') as f:
      if f.read(6) != fmt.MAGIC_PREFIX:
        raise UserError(f'{where} is not a readable .npy file (no NumPy header at its start).')
      f.seek(0)
      version = fmt.read_magic(f)
      read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
      full, fortran, raw = read_header(f)
      offset = f.tell()
  except UserError:
    raise
  except Exception as e:
    raise _library_error(where, '.npy file', e) from None
  shape = _squeezed_shape(full, where)
  dtype = _check_dtype(raw, where)
  axis = 2 if fortran else 0
  slabs = _raw_slabs(path, offset, raw, shape, axis, where, out=dtype)
  return _Source(shape, dtype, None, None, axis, slabs, (path,))


def _nifti_source(path: str, where: str) -> _Source:
  import nibabel as nib
  from nibabel import volumeutils

  try:
    image = nib.load(path)
    proxy = image.dataobj  # what nibabel itself reads: a loaded header's vox_offset is reset to 0
    raw, offset, slope, inter = np.dtype(proxy.dtype), int(proxy.offset), proxy.slope, proxy.inter
    shape = _squeezed_shape(proxy.shape, where)
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    affine = np.asarray(image.affine, dtype=np.float64)
  except UserError:
    raise
  except Exception as e:
    raise _library_error(where, 'NIfTI file', e) from None
  _check_dtype(raw, where)
  scale = lambda slab: volumeutils.apply_read_scaling(slab, slope, inter)
  dtype = _check_dtype(scale(np.zeros(1, raw)).dtype, where)
  opener = open if not path.lower().endswith('.gz') else nib.openers.ImageOpener
  slabs = _raw_slabs(path, offset, raw, shape, 2, where, opener, scale, dtype)
  spacing = zooms if all(z > 0 for z in zooms) else None
  return _Source(shape, dtype, spacing, affine, 2, slabs, (path,))


def _imagej_spacing(tif, shape) -> tuple[float, float, float] | None:
  if not tif.is_imagej or len(shape) != 3:
    return None
  tags = tif.pages[0].tags
  values = [float((tif.imagej_metadata or {}).get('spacing', 1.0))]
  for tag in ('YResolution', 'XResolution'):
    num, den = tags[tag].value if tag in tags else (1, 1)
    values.append(den / num if num else 1.0)
  return tuple(values) if all(math.isfinite(v) and v > 0 for v in values) else None


def _tiff_source(path: str, where: str) -> _Source:
  import tifffile

  try:
    with tifffile.TiffFile(path) as tif:
      series = tif.series[0]
      full, axes, raw = tuple(series.shape), series.axes, np.dtype(series.dtype)
      offset, raw = series.dataoffset, raw.newbyteorder(tif.byteorder)
      paged = len(series.pages) == full[0] and tuple(series.keyframe.shape) == tuple(full[1:])
      spacing = _imagej_spacing(tif, full)
  except Exception as e:
    raise _library_error(where, 'TIFF file', e) from None
  if axes.endswith('S') and full[-1] > 1:
    raise UserError(f'{where} is a colour (RGB) TIFF (shape {full}); expected grey values.')
  shape = _squeezed_shape(full, where)
  dtype = _check_dtype(raw, where)
  if offset is not None:  # uncompressed and contiguous: plain sequential reads
    slabs = _raw_slabs(path, offset, raw, shape, 0, where, out=dtype)
    return _Source(shape, dtype, spacing, None, 0, slabs, (path,))

  def slabs(depth):
    if paged:
      with tifffile.TiffFile(path) as tif:
        for lo in range(0, shape[0], depth):
          planes = tif.asarray(key=range(lo, min(lo + depth, shape[0])), series=0)
          yield _native(planes.reshape((-1, *shape[1:])), dtype)
      return
    array = tifffile.imread(path, series=0).reshape(shape)  # e.g. one compressed page for all
    for lo in range(0, shape[0], depth):
      yield _native(array[lo : lo + depth], dtype)

  return _Source(shape, dtype, spacing, None, 0, slabs, (path,))


def _natural_key(name: str) -> list:
  return [int(t) if t.isdigit() else t.lower() for t in re.split(r'(\d+)', name)]


def _tiff_files(folder: str) -> list[str]:
  names = [
    n
    for n in os.listdir(folder)
    if n.lower().endswith(('.tif', '.tiff')) and not n.startswith('.')
    if os.path.isfile(os.path.join(folder, n))
  ]
  return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def _tiff_dir_source(path: str, where: str) -> _Source:
  import tifffile

  files = _tiff_files(path)
  first = None
  for f in files:
    try:
      with tifffile.TiffFile(f) as tif:
        series = tif.series[0]
        plane, raw = tuple(series.shape), np.dtype(series.dtype)
        if first is None:
          spacing = _imagej_spacing(tif, (len(files), *plane))
    except Exception as e:
      raise _library_error(f'{where}: slice {os.path.basename(f)!r}', 'TIFF file', e) from None
    if len(plane) != 2:
      raise UserError(
        f'{where}: slice {os.path.basename(f)!r} has shape {plane}; every file must be one 2D '
        'grey-value slice.'
      )
    if first is None:
      first = (f, plane, raw)
    elif (plane, raw) != first[1:]:
      raise UserError(
        f'{where}: slice {os.path.basename(f)!r} is {plane[0]}x{plane[1]} {raw}, but '
        f'{os.path.basename(first[0])!r} is {first[1][0]}x{first[1][1]} {first[2]}: all slices '
        'must have the same size and type.'
      )
  shape, dtype = (len(files), *first[1]), _check_dtype(first[2], where)

  def slabs(depth):
    for lo in range(0, len(files), depth):
      yield _native(np.stack([tifffile.imread(f) for f in files[lo : lo + depth]]), dtype)

  return _Source(shape, dtype, spacing, None, 0, slabs, tuple(files))


_SOURCES = {
  'npy': _npy_source,
  'nifti': _nifti_source,
  'tiff': _tiff_source,
  'tiff_dir': _tiff_dir_source,
}


def _default_cache_dir() -> str:
  user = os.getuid() if hasattr(os, 'getuid') else 'user'
  return os.path.join(tempfile.gettempdir(), f'jule3d-cache-{user}')


def _cached_copy(
  source: _Source, kind: str, path: str, cache_dir: str | None, chunk: int, where: str
) -> str:
  stamp = [(os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in source.files]
  key = json.dumps([_CACHE_VERSION, kind, os.path.abspath(path), chunk, stamp])
  stem = re.sub(r'[^A-Za-z0-9._-]', '_', os.path.basename(os.path.abspath(path)))[:60]
  cache_dir = cache_dir or _default_cache_dir()
  final = os.path.join(cache_dir, f'{stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.zarr')
  if os.path.isdir(final):
    return final
  created = not os.path.exists(cache_dir)
  try:
    os.makedirs(cache_dir, exist_ok=True)
  except OSError as e:
    raise UserError(
      f'cache folder {cache_dir!r} for {where} cannot be created: {e.strerror}.'
    ) from None
  logging.info('converting %s to chunked zarr %s (once; later runs reuse it)', path, final)
  try:
    _convert(source, final, chunk, where, path)
  except BaseException:
    if created:
      with contextlib.suppress(OSError):
        os.rmdir(cache_dir)  # only when empty: never touches what was there before
    raise
  return final


def _slab_depth(plane_bytes: int, chunk: int) -> int:
  # The largest divisor of `chunk` that fits the budget: slabs stay chunk-aligned, so each chunk is
  # written whole (no read-modify-write) unless a single plane stack of `chunk` is too large.
  fits = [d for d in range(1, chunk + 1) if chunk % d == 0 and d * plane_bytes <= _SLAB_BYTES]
  return max(fits, default=1)


def _convert(source: _Source, final: str, chunk: int, where: str, path: str) -> None:
  tmp = temp_path(final)
  plane = math.prod(source.shape) // source.shape[source.axis] * source.dtype.itemsize
  slabs, lo, pending = source.slabs(_slab_depth(plane, chunk)), 0, None
  try:
    try:
      spacing = source.spacing or (1.0, 1.0, 1.0)
      source_path = os.path.abspath(path)
      store = create_zarr(
        tmp, source.shape, source.dtype, spacing, source.affine, chunk, source=source_path
      )
      while lo < source.shape[source.axis]:
        try:
          slab = next(slabs)
        except Exception as e:
          if isinstance(e, MemoryError):
            raise
          raise UserError(
            f'{where} could not be read to the end: the file looks damaged or truncated '
            f'({_first_line(e)}).'
          ) from None
        written = store[_along(source.axis, lo, lo + slab.shape[source.axis])].write(slab)
        if pending is not None:
          pending.result()  # two slabs in flight at most: read the next while this one compresses
        pending, lo = written, lo + slab.shape[source.axis]
      if pending is not None:
        pending.result()
    except (UserError, MemoryError):
      raise
    except Exception as e:  # the source was fine: writing the copy failed (disk full, permissions)
      raise UserError(
        f'the converted copy of {where} could not be written in {os.path.dirname(final)!r} '
        f'({_first_line(e)}): set a writable cache folder with enough free space.'
      ) from None
    finally:
      slabs.close()
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  try:
    os.rename(tmp, final)
  except OSError:
    shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.isdir(final):  # else a concurrent conversion of the same file won the race
      raise


# --- Writing --------------------------------------------------------------------------------------


def temp_path(final_path: str) -> str:
  """A fresh hidden sibling of `final_path` (same folder, so renaming it onto the final is atomic).

  Args:
    final_path: where the output will end up.

  Returns:
    The temporary path (not created).
  """
  folder, base = os.path.split(os.path.abspath(final_path))
  return os.path.join(folder, f'.{base}.tmp-{uuid.uuid4().hex[:12]}')


def create_zarr(
  path: str,
  shape: Sequence[int],
  dtype,
  spacing: Sequence[float],
  affine: np.ndarray | None = None,
  chunk: int = 64,
  **attrs,
) -> ts.TensorStore:
  """Creates a writable chunked zarr v2 store with 'spacing' (and 'affine') attributes.

  For outputs streamed slab by slab: create it at `temp_path(final)`, write it, then `commit_zarr`;
  or use the `zarr_writer` context manager, which does all three and cleans up on error.

  Args:
    path: the (temporary) folder to create; must not exist.
    shape: 3D shape.
    dtype: voxel dtype (bool is stored as uint8).
    spacing: voxel spacing per axis.
    affine: optional 4x4 voxel-to-world matrix.
    chunk: chunk edge.
    **attrs: more JSON-serialisable attributes.

  Returns:
    The store, open for writing (initially all 0).
  """
  dtype = np.dtype(np.uint8) if np.dtype(dtype).kind == 'b' else np.dtype(dtype)
  attrs['spacing'] = [float(s) for s in spacing]
  if len(shape) != 3 or len(attrs['spacing']) != 3:
    raise ValueError(f'expected a 3D shape and 3 spacings, got {tuple(shape)} and {tuple(spacing)}')
  if affine is not None:
    attrs['affine'] = np.asarray(affine, dtype=np.float64).reshape(4, 4).tolist()
  metadata = {
    'shape': [int(s) for s in shape],
    'chunks': [max(1, min(int(chunk), int(s))) for s in shape],
    'dtype': dtype.newbyteorder('<').str,
    'compressor': _COMPRESSOR,
    'fill_value': 0,
    'order': 'C',
  }
  store = ts.open(
    {'driver': 'zarr', 'kvstore': _file_kvstore(path), 'metadata': metadata},
    create=True,
    open=False,
  ).result()
  with open(os.path.join(path, '.zattrs'), 'w') as f:
    json.dump(attrs, f)
  return store


def commit_zarr(tmp_path: str, final_path: str, *, overwrite: bool = True) -> None:
  """Moves a finished store to its final name; an existing one there is replaced.

  `final_path` never holds a partial store: an old store is first renamed aside (for an instant
  there is none), the new one renamed in, then the old one deleted.

  Args:
    tmp_path: the finished store (from `temp_path` + `create_zarr`).
    final_path: its final name, in the same folder.
    overwrite: replace an existing `final_path`; if False, raise FileExistsError instead.
  """
  if not os.path.lexists(final_path):
    os.rename(tmp_path, final_path)
    return
  if not overwrite:
    raise FileExistsError(f'{final_path!r} exists and overwrite=False')
  aside = temp_path(final_path)
  os.rename(final_path, aside)
  try:
    os.rename(tmp_path, final_path)
  except BaseException:
    os.rename(aside, final_path)
    raise
  if os.path.isdir(aside) and not os.path.islink(aside):
    shutil.rmtree(aside)
  else:
    os.unlink(aside)


@contextlib.contextmanager
def zarr_writer(
  path: str,
  shape: Sequence[int],
  dtype,
  spacing: Sequence[float],
  affine: np.ndarray | None = None,
  chunk: int = 64,
) -> Iterator[ts.TensorStore]:
  """Context manager: a writable zarr committed to `path` on success, removed on any error.

  Args:
    path: final folder of the store.
    shape: 3D shape.
    dtype: voxel dtype.
    spacing: voxel spacing per axis.
    affine: optional 4x4 voxel-to-world matrix.
    chunk: chunk edge.

  Returns:
    A context manager yielding the writable store (write it completely, e.g. slab by slab).
  """
  tmp = temp_path(path)
  try:
    yield create_zarr(tmp, shape, dtype, spacing, affine, chunk)
    commit_zarr(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def save_zarr(
  path: str,
  array: np.ndarray,
  spacing: Sequence[float],
  affine: np.ndarray | None = None,
  chunk: int = 64,
) -> None:
  """Writes an in-memory 3D array as a chunked zarr, atomically (an existing store is replaced).

  Args:
    path: the store's folder.
    array: 3D integer, float or bool (stored as uint8) array.
    spacing: voxel spacing per axis.
    affine: optional 4x4 voxel-to-world matrix.
    chunk: chunk edge.
  """
  array = np.asarray(array)
  if array.dtype.kind not in 'biuf':
    raise ValueError(f'cannot store dtype {array.dtype} as a volume')
  dtype = np.dtype(np.uint8) if array.dtype.kind == 'b' else array.dtype.newbyteorder('=')
  with zarr_writer(path, array.shape, dtype, spacing, affine, chunk) as store:
    store.write(array.astype(dtype, copy=False)).result()


def write_nifti(
  path: str,
  array_or_volume: 'np.ndarray | Volume',
  spacing: Sequence[float],
  affine: np.ndarray | None = None,
) -> None:
  """Writes a .nii.gz (or .nii) atomically: a temporary file in the same folder, then os.replace.

  A Volume is streamed in slabs along its last axis (NIfTI's slowest), never loaded whole. The
  affine's column lengths are set to `spacing` (direction and origin kept); without an affine,
  diag(spacing) is used. Booleans are written as uint8, float16 as float32 (NIfTI has no float16).

  Args:
    path: output file, ending in .nii.gz or .nii.
    array_or_volume: a 3D numpy array or a Volume.
    spacing: voxel spacing per axis (the header zooms).
    affine: optional 4x4 voxel-to-world matrix (sform and qform).
  """
  import gzip

  import nibabel as nib

  compressed = path.lower().endswith('.nii.gz')
  if not compressed and not path.lower().endswith('.nii'):
    raise ValueError(f'NIfTI output must end in .nii.gz or .nii, got {path!r}')
  if isinstance(array_or_volume, Volume):
    vol = array_or_volume
    shape, dtype = vol.shape, vol.dtype
    read = lambda k0, k1: vol.read((0, 0, k0), (shape[0], shape[1], k1))
  else:
    array = np.asarray(array_or_volume)
    shape, dtype = array.shape, array.dtype
    read = lambda k0, k1: array[:, :, k0:k1]
  if len(shape) != 3 or dtype.kind not in 'biuf':
    raise ValueError(f'expected a 3D integer/float/bool volume, got shape {shape} {dtype}')
  dtype = {'b': np.dtype(np.uint8)}.get(dtype.kind, dtype)
  dtype = np.dtype(np.float32) if dtype == np.float16 else dtype.newbyteorder('=')
  spacing = [float(s) for s in spacing]
  base = np.diag([*spacing, 1.0]) if affine is None else _rescale_affine(affine, spacing)
  header = nib.Nifti1Image(np.broadcast_to(np.zeros((), dtype), shape), base).header
  header.set_qform(base, code='aligned')
  header.set_sform(base, code='aligned')
  header.set_zooms(spacing)
  tmp = temp_path(path)
  try:
    with open(tmp, 'wb') as raw, contextlib.ExitStack() as stack:
      # No file name or time in the gzip header: the temporary name is not recorded, and the same
      # volume gives the same bytes.
      gz = lambda: gzip.GzipFile(filename='', mode='wb', fileobj=raw, compresslevel=6, mtime=0)
      f = stack.enter_context(gz()) if compressed else raw
      header.write_to(f)
      f.write(b'\0' * (int(header.get_data_offset()) - f.tell()))
      depth = max(1, _SLAB_BYTES // 4 // max(1, shape[0] * shape[1] * dtype.itemsize))
      for k0 in range(0, shape[2], depth):
        f.write(np.asarray(read(k0, min(k0 + depth, shape[2]))).astype(dtype).tobytes(order='F'))
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


# --- Checks ---------------------------------------------------------------------------------------

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


def validate_volume(vol: Volume, *, min_size: int) -> None:
  """Checks that a volume can be segmented: every axis holds a patch, no NaN/inf voxel.

  Float volumes are scanned slab by slab (one read pass, memory of one slab).

  Args:
    vol: the opened volume.
    min_size: the patch edge (config.patches.patch_size).

  Raises:
    UserError: naming the volume, the axis or the first slab with a non-finite voxel.
  """
  for axis, size in enumerate(vol.shape):
    if size < min_size:
      raise UserError(
        f'volume {vol.path!r} has {size} voxels along axis {axis} (shape {vol.shape}), fewer '
        f'than one patch (config.patches.patch_size = {min_size}): use a smaller patch or a '
        'larger volume.'
      )
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
