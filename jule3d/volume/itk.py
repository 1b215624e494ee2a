"""NRRD, MetaImage and DICOM series through SimpleITK (ITK's readers, GDCM for DICOM)."""

import os
import re

import numpy as np

from jule3d.errors import UserError
from jule3d.volume.core import _first_line, _library_error, _native, _Source, _squeezed_shape
from jule3d.volume.geometry import _LPS

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


def _itk_file_source(path: str, where: str, kind: str) -> _Source:
  # kind: 'nrrd' or 'meta' (bound in convert._SOURCES).
  import SimpleITK as sitk

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
