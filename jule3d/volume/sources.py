"""Sources read by numpy, nibabel and tifffile (.npy, NIfTI, TIFF, TIFF folders), slab by slab."""

import math
import os
import re

import numpy as np

from jule3d.errors import UserError
from jule3d.volume.core import _check_dtype, _library_error, _native, _Source, _squeezed_shape


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
