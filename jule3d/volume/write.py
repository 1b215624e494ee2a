"""Atomic volume writers: zarr (whole or streamed), NIfTI, NRRD/MetaImage, on jule3d.files names."""

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence

import numpy as np
import tensorstore as ts

from jule3d.files import atomic_path, remove_path, temp_path
from jule3d.volume.core import _COMPRESSOR, _SLAB_BYTES, Volume, _file_kvstore
from jule3d.volume.geometry import _LPS, _output_geometry


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
  remove_path(aside)  # the new store is in place: failing to delete the old one is no failure


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
  with atomic_path(path) as tmp:
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
