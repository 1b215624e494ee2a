"""The conversion cache: each non-chunked source converted once into a chunked zarr copy."""

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import shutil
import tempfile

from absl import logging

from jule3d.errors import UserError
from jule3d.files import temp_path
from jule3d.volume.core import _SLAB_BYTES, _along, _first_line, _Source
from jule3d.volume.itk import _dicom_source, _itk_file_source
from jule3d.volume.sources import _nifti_source, _npy_source, _tiff_dir_source, _tiff_source
from jule3d.volume.write import create_zarr

_CACHE_VERSION = 1  # part of the cache key: bump it when the converted layout changes


_SOURCES = {
  'npy': _npy_source,
  'nifti': _nifti_source,
  'tiff': _tiff_source,
  'tiff_dir': _tiff_dir_source,
  'nrrd': functools.partial(_itk_file_source, kind='nrrd'),
  'meta': functools.partial(_itk_file_source, kind='meta'),
  'dicom': _dicom_source,
}


def _default_cache_dir() -> str:
  user = os.getuid() if hasattr(os, 'getuid') else 'user'
  return os.path.join(tempfile.gettempdir(), f'jule3d-cache-{user}')


def _cached_copy(
  source: _Source, kind: str, path: str, cache_dir: str | None, chunk: int, where: str
) -> str:
  stats = [(os.path.abspath(f), os.stat(f)) for f in source.files]
  stamp = [(f, st.st_size, st.st_mtime_ns) for f, st in stats]
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
