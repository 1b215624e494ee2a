"""`open_volume` (any supported input, jule3d.volume docstring) and `derived_copy`."""

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorstore as ts
from absl import logging

from jule3d.errors import UserError
from jule3d.volume.convert import _SOURCES, _cached_copy
from jule3d.volume.core import (
  SUPPORTED,
  Volume,
  _check_dtype,
  _file_kvstore,
  _first_line,
  _open_spec,
  _squeezed_shape,
  _where,
)
from jule3d.volume.geometry import _check_spacing, _geometry, _spacing_fields
from jule3d.volume.itk import _dicom_series
from jule3d.volume.sources import _tiff_files
from jule3d.volume.write import zarr_writer


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
  """Opens a volume in any supported format (jule3d.volume docstring), converting it once if needed.

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
    ValueError: a chunk edge below 1 (the caller's; config.data.cache_chunk is checked in
      jule3d/checks.py).
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
    raise ValueError(f'open_volume: chunk = {chunk!r}; expected a positive integer.')
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
