"""Volumes in and out (method §1): open any supported format via tensorstore, convert once, write.

`open_volume` accepts
  * a zarr v2 / zarr v3 / N5 array folder, or a tensorstore JSON spec (a `.json` file, or inline
    text starting with '{'): opened IN PLACE, read-only, never copied. Spacing comes from the
    attribute 'spacing' (N5 also 'resolution' / 'pixelResolution'); an 'affine' attribute is kept.
    Chunks missing from the store read as the fill value (tensorstore's rule), without an error.
  * `.nii` / `.nii.gz`, `.nrrd` / `.nhdr` (3D Slicer's default), `.mha` / `.mhd`, a folder holding
    one DICOM series, a multi-page `.tif` / `.tiff`, a folder of 2D TIFF slices (one per index of
    axis 0, natural sort: slice2 before slice10), `.npy`: converted ONCE into a chunked blosc/zstd
    zarr v2 under `cache_dir`, slab by slab, so a volume larger than RAM converts. The cache name
    hashes the absolute path, size and mtime of every source file (an edited file is converted
    again); the copy is written under a temporary name and renamed, so the cache never holds a
    partial volume. Superseded copies are not deleted (a running job may still read them).

How each converted format is streamed (memory: a few slabs of `chunk` planes):
  * NIfTI: the header is parsed by nibabel, the voxels are read sequentially along the last array
    axis (the slowest on disk), so even a `.nii.gz` streams in one pass instead of loading whole;
    scl_slope / scl_inter are applied as nibabel does. The affine is nibabel's `image.affine`.
  * NRRD, MetaImage, DICOM: read by SimpleITK (ITK's readers, GDCM for DICOM), WHOLE: memory of one
    copy of the volume. Headers are read first (every DICOM file's), the voxels only on conversion.
    A detached header (.nhdr, .mhd) is stamped with its data file. A DICOM folder must hold exactly
    one series (SeriesInstanceUID); its slices are ordered by position along the slice normal (not
    by file name) and must be evenly spaced. DICOM voxels are what ITK gives: rescale slope /
    intercept applied by GDCM, so CT comes out in HU with the pixel type ITK chooses for them.
  * multi-page TIFF: memory-mapped when uncompressed and contiguous, else read page by page; other
    layouts (e.g. one compressed page holding the whole volume) are loaded whole. ImageJ files give
    their spacing (z from 'spacing', y/x from the resolution tags); other TIFFs carry none.
  * TIFF folder: one file per plane; every file's header is checked before anything is converted.
  * `.npy`: memory-mapped (`mmap_mode='r'`), read along its slowest axis.

Axes are the array axes as stored: NIfTI's (i, j, k), and the same ITK index order (i, j, k) =
(x, y, z) for NRRD, MetaImage and DICOM (the transpose of SimpleITK's numpy [z, y, x] view). Integer
and float dtypes are kept as they are (CT int16 with negative values included); bool becomes uint8.
A 4D+ image whose extra trailing axes all have size 1 is accepted as 3D. Stores are translated so
that every axis starts at 0.

Geometry: the file's is the truth. `Volume.affine` is the 4x4 voxel-to-world matrix in NIfTI's RAS
convention (ITK's LPS direction / origin / spacing converted: A[:3, :3] = diag(-1, -1, 1) @ direction
@ diag(spacing), A[:3, 3] = diag(-1, -1, 1) @ origin), and `Volume.spacing` its column lengths. A
spacing given to `open_volume` (config.data.spacing) applies only to an input that carries none; one
that disagrees with the file's is refused unless `spacing_override` (then it replaces the file's,
direction and origin kept). `Volume.geometry` says where the spacing came from.

Writers: `save_zarr` (an in-memory array), `create_zarr` + `commit_zarr` or the `zarr_writer`
context manager (outputs streamed slab by slab), `write_nifti`, `write_itk` (.nrrd, .nhdr, .mha,
.mhd). All are atomic: the final name never holds a partial volume. Outputs carry 'spacing' (and
'affine') attributes or header fields that `open_volume` reads back unchanged.
"""

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorstore as ts
from absl import logging

from jule3d.errors import UserError

SUPPORTED = (
  'a zarr (v2 or v3) or N5 array folder, a folder of 2D .tif slices, a folder of one DICOM series, '
  "a tensorstore spec (.json file or inline '{...}'), .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, "
  '.tif, .tiff, .npy'
)
# Where Volume.spacing came from (Volume.geometry).
GEOMETRIES = ('file', 'config', 'override', 'expected', 'default')
_SPACING_RTOL = 1e-4  # a given spacing "agrees" with the file's within this relative error per axis
_LPS = np.diag([-1.0, -1.0, 1.0])  # ITK's LPS world <-> NIfTI's RAS world (its own inverse)
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
  spacing_override: bool = False,
  expected_spacing: Sequence[float] = (),
  chunk: int = 64,
  name: str = 'volume',
) -> Volume:
  """Opens a volume in any supported format (module docstring), converting it once if needed.

  The file's geometry is kept exactly. `spacing` applies only to an input that carries none (npy,
  a zarr/N5 without a spacing attribute, a TIFF without ImageJ calibration); if the file has one
  and `spacing` disagrees (relative error above 1e-4 on an axis), the input is refused, unless
  `spacing_override`. `expected_spacing` is used for an input without spacing when `spacing` is
  not given; a file whose own spacing differs from it keeps its own (a warning is logged).

  Args:
    path: a file or folder path, or an inline tensorstore JSON spec.
    cache_dir: where converted copies live (default: a per-user folder under the system temp dir).
    spacing: voxel spacing, one positive number per array axis (config.data.spacing); () = none.
    spacing_override: `spacing` replaces the file's spacing (direction and origin kept).
    expected_spacing: the spacing this input is expected to have (config.data.expected_spacing).
    chunk: chunk edge of converted copies.
    name: how error messages name the input, e.g. 'data.path' (shown as config.data.path).

  Returns:
    The opened Volume.

  Raises:
    UserError: missing, unreadable, unsupported, damaged or non-3D input, a bad or conflicting
      spacing; raised before any conversion, except for damage found only while converting
      (nothing is left behind).
  """
  path = os.fspath(path) if not isinstance(path, str) else path
  where = _where(name, path)
  fields = _spacing_fields(name)
  given = _check_spacing(spacing, f'{fields[0]} = {tuple(spacing)!r} (for {where})')
  expected = _check_spacing(
    expected_spacing, f'{fields[2]} = {tuple(expected_spacing)!r} (for {where})'
  )
  if not isinstance(spacing_override, bool):
    raise UserError(f'{fields[1]} = {spacing_override!r}: expected True or False.')
  if spacing_override and given is None:
    raise UserError(
      f'{fields[1]} = True (for {where}) but {fields[0]} is not set: set it to the 3 voxel edges '
      f"that replace the file's spacing, or set {fields[1]}=False."
    )
  if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
    raise UserError(f'config.data.cache_chunk = {chunk!r}: expected a positive integer (e.g. 64).')
  kind = _kind(path, where)
  source = None
  if kind in ('zarr', 'zarr3', 'n5', 'json'):
    store, attrs, rank = _open_in_place(kind, path, where)
    store = _as_3d(store, where)
    file_spacing, affine = _attr_metadata(attrs, rank, where, lenient=given is not None)
  else:
    source = _SOURCES[kind](path, where)
    file_spacing, affine = source.spacing, source.affine
  final_spacing, affine, geometry = _geometry(
    file_spacing, affine, given, spacing_override, expected, where, fields
  )
  if source is not None:  # the geometry is settled: only now the (expensive) conversion
    final = _cached_copy(source, kind, path, cache_dir, chunk, where)
    store = _open_spec({'driver': 'zarr', 'kvstore': _file_kvstore(final)}, where)
  return Volume(
    store=store,
    shape=tuple(int(s) for s in store.shape),
    dtype=np.dtype(store.dtype.numpy_dtype),
    spacing=tuple(float(s) for s in final_spacing),
    affine=affine,
    path=path,
    geometry=geometry,
  )


def _spacing_fields(name: str) -> tuple[str, str, str]:
  # How messages name the spacing, override and expected-spacing inputs: config fields for a
  # configured input, open_volume's arguments otherwise.
  if '.' in name:
    return ('config.data.spacing', 'config.data.spacing_override', 'config.data.expected_spacing')
  return ('spacing', 'spacing_override', 'expected_spacing')


def _fmt(values: Sequence[float]) -> str:
  return '(' + ', '.join(f'{float(v):.6g}' for v in values) + ')'


def _close(a: Sequence[float], b: Sequence[float], rtol: float = _SPACING_RTOL) -> bool:
  return all(abs(x - y) <= rtol * max(abs(x), abs(y)) for x, y in zip(a, b, strict=True))


def affine_spacing(affine: np.ndarray) -> tuple[float, float, float]:
  """The voxel spacing an affine implies: the lengths of its first three columns.

  Args:
    affine: 4x4 voxel-to-world matrix.

  Returns:
    One spacing per array axis.
  """
  return tuple(float(n) for n in np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0))


def _geometry(file_spacing, affine, given, override, expected, where, fields):
  """(spacing, affine, Volume.geometry) from what the file carries and what the caller gave."""
  if affine is not None:
    norms = affine_spacing(affine)
    if not all(math.isfinite(n) and n > 0 for n in norms) or not np.isfinite(affine).all():
      logging.warning(
        '%s: its affine %s is degenerate (an axis of length 0): ignored, the volume is treated as '
        'carrying no geometry.',
        where,
        np.asarray(affine).tolist(),
      )
      affine, file_spacing = None, None
    else:
      if file_spacing is not None and not _close(file_spacing, norms):
        logging.warning(
          "%s: its spacing attribute %s differs from its affine's column lengths %s: the affine's "
          'are used.',
          where,
          _fmt(file_spacing),
          _fmt(norms),
        )
      file_spacing = norms
  if file_spacing is not None:
    if given is not None and override:
      logging.warning(
        "%s: %s = %s replaces the file's voxel spacing %s (%s=True; direction and origin kept).",
        where,
        fields[0],
        _fmt(given),
        _fmt(file_spacing),
        fields[1],
      )
      return given, (None if affine is None else _rescale_affine(affine, given)), 'override'
    if given is not None and not _close(given, file_spacing):
      advice = (
        f"remove {fields[0]} to use the file's, or set {fields[1]}=True to replace it"
        if '.' in fields[0]
        else f"pass {fields[0]}=() to use the file's, or {fields[1]}=True to replace it"
      )
      raise UserError(
        f'{fields[0]} = {_fmt(given)} differs from the voxel spacing {_fmt(file_spacing)} in the '
        f'header of {where}: {advice}.'
      )
    if given is None and expected is not None and not _close(expected, file_spacing):
      logging.warning(
        "%s has voxel spacing %s (from the file), not %s (%s, this config's paper volume): fine "
        "for your own data, the file's is used; check the threshold suits it.",
        where,
        _fmt(file_spacing),
        _fmt(expected),
        fields[2],
      )
    return tuple(file_spacing), affine, 'file'
  if given is not None:
    return given, None, 'config'
  if expected is not None:
    return expected, None, 'expected'
  logging.warning(
    '%s carries no voxel spacing: using 1.0 per axis; set %s to its voxel edges (one per array '
    'axis) if they matter.',
    where,
    fields[0],
  )
  return (1.0, 1.0, 1.0), None, 'default'


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


_EXTENSIONS = {  # file name ending -> kind (longest endings first)
  '.nii.gz': 'nifti',
  '.nii': 'nifti',
  '.nrrd': 'nrrd',
  '.nhdr': 'nrrd',
  '.mha': 'meta',
  '.mhd': 'meta',
  '.tiff': 'tiff',
  '.tif': 'tiff',
  '.npy': 'npy',
  '.json': 'json',
}


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
  ext = next((e for e in _EXTENSIONS if lower.endswith(e)), '')
  if not ext:
    raise UserError(
      f'{where}: unsupported file type {os.path.splitext(path)[1] or "(no extension)"!r}; '
      f'expected {SUPPORTED}.'
    )
  if not os.access(path, os.R_OK):
    raise UserError(f'{where}: permission denied, this file cannot be read by you.')
  return _EXTENSIONS[ext]


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
  if _dicom_series(path, where):
    return 'dicom'
  raise UserError(
    f'{where} is a folder with neither zarr/N5 metadata (.zarray, zarr.json, attributes.json) nor '
    f'.tif/.tiff slices nor DICOM files; expected {SUPPORTED}.'
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


def _attr_metadata(attrs: dict, rank: int, where: str, lenient: bool):
  # `lenient`: a spacing is given for this input, so a malformed spacing attribute is not fatal
  # (the input is then treated as carrying none).
  spacing = None
  for key in ('spacing', 'resolution', 'pixelResolution'):
    value = attrs.get(key)
    if isinstance(value, dict):  # N5 viewer style: {"dimensions": [...], "unit": "um"}
      value = value.get('dimensions')
    if value is None:
      continue
    if isinstance(value, list) and len(value) == rank > 3:  # a squeezed trailing axis
      value = value[:3]
    try:
      spacing = _check_spacing(value, f'{where}: attribute {key!r} = {value!r}', allow_empty=False)
    except UserError as e:
      if not lenient:
        raise
      logging.warning('%s (ignored: the given spacing is used instead)', e)
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
    affine = np.array(image.affine, dtype=np.float64)  # sform / qform / pixdim, nibabel's choice
  except UserError:
    raise
  except Exception as e:
    raise _library_error(where, 'NIfTI file', e) from None
  _check_dtype(raw, where)
  scale = lambda slab: volumeutils.apply_read_scaling(slab, slope, inter)
  dtype = _check_dtype(scale(np.zeros(1, raw)).dtype, where)
  opener = open if not path.lower().endswith('.gz') else nib.openers.ImageOpener
  slabs = _raw_slabs(path, offset, raw, shape, 2, where, opener, scale, dtype)
  # Spacing: the affine's column lengths (open_volume), not pixdim.
  return _Source(shape, dtype, None, affine, 2, slabs, (path,))


def _imagej_spacing(tif, shape) -> tuple[float, float, float] | None:
  # An ImageJ file is calibrated when it has a z 'spacing' or a resolution other than 1 pixel per
  # unit; an uncalibrated one (every TIFF has resolution tags, 1/1 by default) carries no spacing.
  if not tif.is_imagej or len(shape) != 3:
    return None
  tags = tif.pages[0].tags
  meta = tif.imagej_metadata or {}
  values, calibrated = [float(meta.get('spacing', 1.0))], 'spacing' in meta
  for tag in ('YResolution', 'XResolution'):
    num, den = tags[tag].value if tag in tags else (1, 1)
    values.append(den / num if num else 1.0)
    calibrated |= tag in tags and num != den
  ok = calibrated and all(math.isfinite(v) and v > 0 for v in values)
  return tuple(values) if ok else None


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


# --- ITK formats (NRRD, MetaImage, DICOM) through SimpleITK ---------------------------------------

_ITK_WHAT = {'nrrd': 'NRRD file', 'meta': 'MetaImage file', 'dicom': 'DICOM file'}


def _itk_dtypes() -> dict:
  import SimpleITK as sitk

  return {
    sitk.sitkUInt8: np.uint8,
    sitk.sitkInt8: np.int8,
    sitk.sitkUInt16: np.uint16,
    sitk.sitkInt16: np.int16,
    sitk.sitkUInt32: np.uint32,
    sitk.sitkInt32: np.int32,
    sitk.sitkUInt64: np.uint64,
    sitk.sitkInt64: np.int64,
    sitk.sitkFloat32: np.float32,
    sitk.sitkFloat64: np.float64,
  }


def _itk_message(e: BaseException) -> str:
  # ITK's exceptions start with the C++ source location: keep what the reader says went wrong.
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  for i, line in enumerate(lines):
    if 'ERROR:' in line:
      text = re.sub(r'^\w+\(0x[0-9a-fA-F]+\):\s*', '', line.split('ERROR:', 1)[1].strip())
      if i + 1 < len(lines):  # e.g. teem's innermost complaint for NRRD
        text += ' ' + re.sub(r'^\[\w+\]\s*\w+:\s*', '', lines[-1])
      return text[:300]
  return _first_line(e)


def _itk_error(where: str, what: str, e: Exception) -> UserError:
  return _library_error(where, what, RuntimeError(_itk_message(e)))


def _itk_info(path: str, where: str, what: str):
  import SimpleITK as sitk

  reader = sitk.ImageFileReader()
  reader.SetFileName(path)
  try:
    reader.ReadImageInformation()
  except RuntimeError as e:
    raise _itk_error(where, what, e) from None
  if reader.GetNumberOfComponents() > 1:
    raise UserError(
      f'{where} is a vector / colour (RGB) image ({reader.GetNumberOfComponents()} components per '
      'voxel); expected grey values.'
    )
  return reader


def _itk_dtype(pixel_id: int, where: str) -> np.dtype:
  import SimpleITK as sitk

  dtype = _itk_dtypes().get(pixel_id)
  if dtype is None:
    raise UserError(
      f'{where} has voxels of type {sitk.GetPixelIDValueAsString(pixel_id)}; expected integers or '
      'floats.'
    )
  return np.dtype(dtype)


def _itk_affine(spacing, origin, direction) -> np.ndarray:
  """The RAS voxel-to-world matrix of ITK's (LPS) spacing, origin and direction (3D)."""
  affine = np.eye(4)
  direction = np.asarray(direction, np.float64).reshape(3, 3)
  affine[:3, :3] = _LPS @ direction @ np.diag(np.asarray(spacing, np.float64))
  affine[:3, 3] = _LPS @ np.asarray(origin, np.float64)
  return affine


def _itk_header(path: str) -> dict[str, str]:
  """The header fields of a NRRD / MetaImage file, lower-case names (only the text part is read)."""
  with open(path, 'rb') as f:
    text = f.read(1 << 16).decode('latin-1')
  fields = {}
  nrrd = path.lower().endswith(('.nrrd', '.nhdr'))
  for line in text.splitlines()[1 if nrrd else 0 :]:
    if nrrd:
      if not line.strip():
        break  # the blank line ending a NRRD header
      key, sep, value = line.partition(':')
      if line.startswith('#') or not sep or value.startswith('='):  # comments, key:=value pairs
        continue
    else:
      key, sep, value = line.partition('=')
      if not sep:
        break
    fields[key.strip().lower()] = value.strip()
    if not nrrd and key.strip().lower() == 'elementdatafile':
      break  # the voxels follow
  return fields


def _detached_data_file(path: str, fields: dict[str, str], where: str) -> str | None:
  """The data file a detached header (.nhdr, .mhd) names, checked to exist (None: none / many)."""
  name = fields.get('data file', fields.get('datafile', fields.get('elementdatafile', '')))
  if not name or name.upper() in ('LOCAL', 'LIST') or ' ' in name or '%' in name:
    return None  # attached, or a list / pattern of files: the header alone is stamped
  data = os.path.join(os.path.dirname(os.path.abspath(path)), name)
  if not os.path.isfile(data):
    raise UserError(
      f'{where}: its header names the data file {name!r}, which is not in '
      f'{os.path.dirname(data)!r}: copy it beside the header (or give the attached .nrrd/.mha).'
    )
  return data


def _itk_slabs(read, shape: tuple[int, int, int], dtype: np.dtype):
  """Slabs along axis 2 (ITK's slowest, z) of the image `read()` returns, read whole once."""

  def slabs(depth):
    import SimpleITK as sitk

    try:
      image = read()
    except RuntimeError as e:
      raise RuntimeError(_itk_message(e)) from None
    size = tuple(int(s) for s in image.GetSize())
    if _squeezed_shape(size, 'the image') != shape:
      raise ValueError(f'the image read has size {size}, its header said {shape}')
    zyx = sitk.GetArrayViewFromImage(image).reshape(shape[::-1])  # ITK's numpy view is [z, y, x]
    for lo in range(0, shape[2], depth):
      yield _native(zyx[lo : lo + depth].transpose(2, 1, 0), dtype)

  return slabs


def _itk_file_source(path: str, where: str) -> _Source:
  import SimpleITK as sitk

  kind = _kind(path, where)
  what = _ITK_WHAT[kind]
  try:
    fields = _itk_header(path)
  except OSError as e:
    raise _library_error(where, what, e) from None
  data = _detached_data_file(path, fields, where)  # before ITK, which would only say "can't open"
  reader = _itk_info(path, where, what)
  size = tuple(int(s) for s in reader.GetSize())
  shape = _squeezed_shape(size, where)
  dtype = _itk_dtype(reader.GetPixelID(), where)
  spaced = {'space directions', 'spacings'} if kind == 'nrrd' else {'elementspacing', 'elementsize'}
  affine = None
  if spaced & set(fields):  # else the file carries no geometry (ITK would say 1.0, origin 0)
    n = reader.GetDimension()
    direction = np.asarray(reader.GetDirection(), np.float64).reshape(n, n)[:3, :3]
    affine = _itk_affine(reader.GetSpacing()[:3], reader.GetOrigin()[:3], direction)
  pixel = reader.GetPixelID()
  slabs = _itk_slabs(lambda: sitk.ReadImage(path, pixel), shape, dtype)
  return _Source(shape, dtype, None, affine, 2, slabs, (path,) + ((data,) if data else ()))


def _dicom_series(folder: str, where: str) -> tuple[str, ...]:
  """The files of the one DICOM series in `folder`, GDCM's order; () when it holds no DICOM."""
  import SimpleITK as sitk

  reader = sitk.ImageSeriesReader
  ids = tuple(reader.GetGDCMSeriesIDs(folder))
  if not ids:
    return ()
  if len(ids) > 1:
    counts = ', '.join(f'{i} ({len(reader.GetGDCMSeriesFileNames(folder, i))} files)' for i in ids)
    raise UserError(
      f'{where} holds {len(ids)} DICOM series: {counts}; give a folder with one series (move '
      'the files of each series into a folder of its own).'
    )
  return tuple(reader.GetGDCMSeriesFileNames(folder, ids[0]))


def _dicom_source(path: str, where: str) -> _Source:
  import SimpleITK as sitk

  files = _dicom_series(path, where)
  infos = []
  for f in files:
    reader = _itk_info(f, f'{where}: file {os.path.basename(f)!r}', 'DICOM file')
    infos.append(
      (
        f,
        tuple(int(s) for s in reader.GetSize()),
        reader.GetPixelID(),
        np.asarray(reader.GetOrigin(), np.float64),
        np.asarray(reader.GetDirection(), np.float64).reshape(3, 3),
        np.asarray(reader.GetSpacing(), np.float64),
        all(reader.HasMetaDataKey(t) for t in ('0020|0032', '0020|0037'))
        and any(reader.HasMetaDataKey(t) for t in ('0028|0030', '0018|1164')),
      )
    )
  first = infos[0]
  for info in infos[1:]:
    if info[1] != first[1]:
      raise UserError(
        f'{where}: file {os.path.basename(info[0])!r} is {info[1][0]}x{info[1][1]}x{info[1][2]}, '
        f'but {os.path.basename(first[0])!r} is {first[1][0]}x{first[1][1]}x{first[1][2]}: all '
        'files of the series must have the same size.'
      )
  dtype = np.result_type(*(_itk_dtype(i[2], where) for i in infos))
  pixel = {np.dtype(v): k for k, v in _itk_dtypes().items()}[np.dtype(dtype)]
  positioned = all(i[6] for i in infos)
  if len(infos) == 1 or first[1][2] > 1:  # one (multi-frame) file: ITK's own geometry
    if len(infos) > 1:
      raise UserError(
        f'{where}: the series holds {len(infos)} multi-frame files; expected one multi-frame file '
        'or one file per slice.'
      )
    shape = _squeezed_shape(first[1], where)
    affine = _itk_affine(first[5], first[3], first[4]) if positioned else None
    order = [0]
  else:
    shape = (first[1][0], first[1][1], len(infos))
    affine, order = None, list(range(len(infos)))
    if positioned:
      affine, order = _dicom_stack(infos, where)
  files = tuple(infos[i][0] for i in order)
  slabs = _itk_slabs(lambda: sitk.ReadImage(list(files), pixel), shape, dtype)
  return _Source(shape, dtype, None, affine, 2, slabs, files)


def _dicom_stack(infos, where: str) -> tuple[np.ndarray, list[int]]:
  """The affine of single-slice files stacked along their normal, and their order along it."""
  direction, spacing = infos[0][4], infos[0][5]
  for info in infos[1:]:
    if not np.allclose(info[4][:, :2], direction[:, :2], atol=1e-4):
      raise UserError(
        f'{where}: file {os.path.basename(info[0])!r} has another orientation than '
        f'{os.path.basename(infos[0][0])!r}: all slices of the series must share it.'
      )
  normal = direction[:, 2]
  heights = [float(normal @ i[3]) for i in infos]
  order = sorted(range(len(infos)), key=lambda i: heights[i])  # GDCM's order already, normally
  positions = np.stack([infos[i][3] for i in order])
  steps = np.diff(positions, axis=0)
  step = (positions[-1] - positions[0]) / (len(infos) - 1)
  gap = float(np.linalg.norm(step))
  if gap <= 1e-6:
    raise UserError(
      f'{where}: all {len(infos)} slices lie at the same position: not one 3D volume (several time '
      'points or echoes?); give a folder with the files of one volume.'
    )
  off = np.linalg.norm(steps - step, axis=1)
  if off.max() > 0.01 * gap:
    k = int(np.argmax(off))
    names = [os.path.basename(infos[order[j]][0]) for j in (k, k + 1)]
    raise UserError(
      f'{where}: slices {names[0]!r} and {names[1]!r} are {np.linalg.norm(steps[k]):.6g} mm '
      f'apart, the series on average {gap:.6g} mm: the slices are unevenly spaced (a missing slice '
      'or a mixed series?); give a folder with one evenly spaced series.'
    )
  affine = np.eye(4)
  # Columns: the in-plane axes (row, column) scaled by the pixel spacing, then the actual step
  # between slices (ITK itself uses the normal with that step's length: the same unless tilted).
  affine[:3, 0] = _LPS @ direction[:, 0] * spacing[0]
  affine[:3, 1] = _LPS @ direction[:, 1] * spacing[1]
  affine[:3, 2] = _LPS @ step
  affine[:3, 3] = _LPS @ positions[0]
  return affine, order


_SOURCES = {
  'npy': _npy_source,
  'nifti': _nifti_source,
  'tiff': _tiff_source,
  'tiff_dir': _tiff_dir_source,
  'nrrd': _itk_file_source,
  'meta': _itk_file_source,
  'dicom': _dicom_source,
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
  **attrs,
) -> Iterator[ts.TensorStore]:
  """Context manager: a writable zarr committed to `path` on success, removed on any error.

  Args:
    path: final folder of the store.
    shape: 3D shape.
    dtype: voxel dtype.
    spacing: voxel spacing per axis.
    affine: optional 4x4 voxel-to-world matrix.
    chunk: chunk edge.
    **attrs: more JSON-serialisable attributes (create_zarr).

  Returns:
    A context manager yielding the writable store (write it completely, e.g. slab by slab).
  """
  tmp = temp_path(path)
  try:
    yield create_zarr(tmp, shape, dtype, spacing, affine, chunk, **attrs)
    commit_zarr(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def derived_copy(
  final: str,
  shape: Sequence[int],
  dtype,
  spacing: Sequence[float],
  affine: np.ndarray | None,
  chunk: int,
  slabs: Callable[[], Iterator[tuple[int, np.ndarray]]],
  what: str,
) -> Volume:
  """A volume derived from the input, written once at `final` (a cache path) and reused after.

  Written through `zarr_writer` (atomic: `final` never holds a partial copy), slab by slab, only
  when `final` does not exist yet; then opened.

  Args:
    final: the copy's path, named by a key of everything it derives from.
    shape: its shape.
    dtype: its dtype.
    spacing: its spacing.
    affine: its 4x4 voxel-to-world matrix, or None.
    chunk: zarr chunk edge.
    slabs: called only when the copy is missing: yields (z0, slab) covering axis 0.
    what: what the copy is, for messages (e.g. 'working copy of config.data.path').

  Returns:
    The opened copy.

  Raises:
    UserError: the copy cannot be written (disk full, permissions).
  """
  if not os.path.isdir(final):
    try:
      os.makedirs(os.path.dirname(final), exist_ok=True)
      with zarr_writer(final, shape, dtype, spacing, affine, chunk) as store:
        for z0, slab in slabs():
          store[z0 : z0 + len(slab)].write(slab).result()
    except OSError as e:
      raise UserError(
        f'the {what} cannot be written in {os.path.dirname(final)!r} ({e.strerror or e}): free '
        'space there or choose another --workdir.'
      ) from None
  return open_volume(final, name=what)


def save_zarr(
  path: str,
  array: np.ndarray,
  spacing: Sequence[float],
  affine: np.ndarray | None = None,
  chunk: int = 64,
  **attrs,
) -> None:
  """Writes an in-memory 3D array as a chunked zarr, atomically (an existing store is replaced).

  Args:
    path: the store's folder.
    array: 3D integer, float or bool (stored as uint8) array.
    spacing: voxel spacing per axis.
    affine: optional 4x4 voxel-to-world matrix.
    chunk: chunk edge.
    **attrs: more JSON-serialisable attributes (create_zarr).
  """
  array = np.asarray(array)
  if array.dtype.kind not in 'biuf':
    raise ValueError(f'cannot store dtype {array.dtype} as a volume')
  dtype = np.dtype(np.uint8) if array.dtype.kind == 'b' else array.dtype.newbyteorder('=')
  with zarr_writer(path, array.shape, dtype, spacing, affine, chunk, **attrs) as store:
    store.write(array.astype(dtype, copy=False)).result()


def write_nifti(
  path: str,
  array_or_volume: 'np.ndarray | Volume',
  spacing: Sequence[float],
  affine: np.ndarray | None = None,
) -> None:
  """Writes a .nii.gz (or .nii) atomically: a temporary file in the same folder, then os.replace.

  A Volume is streamed in slabs along its last axis (NIfTI's slowest), never loaded whole. An
  affine is written exactly as given (sform; the qform is its closest rotation, as nibabel makes
  it), the zooms are its column lengths and `spacing` is then not used; without an affine,
  diag(spacing) is written. Booleans are written as uint8, float16 as float32 (NIfTI has no
  float16).

  Args:
    path: output file, ending in .nii.gz or .nii.
    array_or_volume: a 3D numpy array or a Volume.
    spacing: voxel spacing per axis (the header zooms when there is no affine).
    affine: optional 4x4 voxel-to-world matrix (sform and qform), e.g. `Volume.affine`.
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
  base, spacing = _output_geometry(spacing, affine)
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


def _output_geometry(spacing: Sequence[float], affine) -> tuple[np.ndarray, list[float]]:
  """(affine, spacing) an output is written with: the affine as given, else diag(spacing)."""
  if affine is None:
    spacing = [float(s) for s in spacing]
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
      raise ValueError(f'expected 3 positive spacings, got {tuple(spacing)}')
    return np.diag([*spacing, 1.0]), spacing
  affine = np.array(affine, dtype=np.float64)
  if affine.shape != (4, 4) or not np.isfinite(affine).all():
    raise ValueError(f'expected a finite 4x4 affine, got {affine.tolist()}')
  spacing = list(affine_spacing(affine))
  if not all(s > 0 for s in spacing):
    raise ValueError(f'the affine has an axis of length 0: {affine.tolist()}')
  return affine, spacing


ITK_SUFFIXES = ('.nrrd', '.nhdr', '.mha', '.mhd')


def write_itk(
  path: str,
  array_or_volume: 'np.ndarray | Volume',
  spacing: Sequence[float],
  affine: np.ndarray | None = None,
) -> None:
  """Writes a .nrrd / .mha (or detached .nhdr / .mhd) through SimpleITK, compressed, atomically.

  The file is written in a hidden temporary folder beside `path` (`temp_path`, a name that
  `files.remove_stale_temporaries` recognises), then renamed into place: a detached data file
  first, the header last. The volume is held whole in memory (twice: numpy and ITK). The RAS
  `affine` becomes ITK's LPS direction, origin and spacing (its column lengths; `spacing` is then
  not used); without one: identity direction, origin 0, `spacing`. Booleans are written as uint8,
  float16 as float32; other dtypes as they are (uint8 labels stay uint8).

  Args:
    path: output file, ending in .nrrd, .nhdr, .mha or .mhd.
    array_or_volume: a 3D numpy array or a Volume (axes (i, j, k) = ITK's (x, y, z)).
    spacing: voxel spacing per axis (used when there is no affine).
    affine: optional 4x4 voxel-to-world matrix (RAS, as `Volume.affine`).
  """
  import SimpleITK as sitk

  if not path.lower().endswith(ITK_SUFFIXES):
    raise ValueError(f'ITK output must end in one of {ITK_SUFFIXES}, got {path!r}')
  if isinstance(array_or_volume, Volume):
    array = array_or_volume.read((0, 0, 0), array_or_volume.shape)
  else:
    array = np.asarray(array_or_volume)
  if array.ndim != 3 or array.dtype.kind not in 'biuf':
    raise ValueError(
      f'expected a 3D integer/float/bool volume, got shape {array.shape} {array.dtype}'
    )
  dtype = {'b': np.dtype(np.uint8)}.get(array.dtype.kind, array.dtype)
  dtype = np.dtype(np.float32) if dtype == np.float16 else dtype.newbyteorder('=')
  base, spacing = _output_geometry(spacing, affine)
  image = sitk.GetImageFromArray(np.ascontiguousarray(array.astype(dtype, copy=False).transpose()))
  image.SetSpacing(spacing)
  if affine is not None:  # else ITK's defaults: identity direction, origin 0
    image.SetDirection((_LPS @ base[:3, :3] / np.asarray(spacing)).ravel().tolist())
    image.SetOrigin((_LPS @ base[:3, 3]).tolist())
  folder, name = os.path.split(os.path.abspath(path))
  tmp = temp_path(path)
  try:
    os.mkdir(tmp)
    sitk.WriteImage(image, os.path.join(tmp, name), useCompression=True)
    for entry in sorted(os.listdir(tmp), key=lambda n: n == name):  # the header last
      os.replace(os.path.join(tmp, entry), os.path.join(folder, entry))
    os.rmdir(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


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
