"""Atomic file writers: a result on disk is either the old one or the new one, never half.

One temporary-name scheme for everything jule3d writes (files, zarr folders, NIfTI/NRRD, figures,
feature parts): `.{final name}.tmp-{12 hex digits}`, optionally followed by the extension a writer
insists on (numpy appends `.npy`/`.npz`), in the final file's folder so that renaming is atomic.
`remove_stale_temporaries` is the clean-up beside it.
"""

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np

from jule3d.workdir import BASELINES, CACHE


def temp_path(final_path: str, suffix: str = '') -> str:
  """A fresh hidden sibling of `final_path` (same folder, so renaming it onto the final is atomic).

  Args:
    final_path: where the output will end up.
    suffix: an extension the writing library adds anyway (e.g. '.npz'), '' for none.

  Returns:
    The temporary path (not created).
  """
  folder, base = os.path.split(os.path.abspath(final_path))
  return os.path.join(folder, f'.{base}.tmp-{uuid.uuid4().hex[:12]}{suffix}')


def remove_path(path: str) -> None:
  """Removes a file, link or folder tree if it exists (errors ignored for a tree)."""
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.unlink(path)


@contextlib.contextmanager
def atomic_path(final_path: str, suffix: str = '') -> Iterator[str]:
  """Yields a temporary path to write; renamed onto `final_path` on success, removed on any error.

  Args:
    final_path: the result's path (replaced if it exists).
    suffix: as for temp_path.

  Yields:
    The temporary path (not created).
  """
  tmp = temp_path(final_path, suffix)
  try:
    yield tmp
    os.replace(tmp, final_path)
  except BaseException:
    remove_path(tmp)
    raise


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to a temporary file beside `path`, fsyncs it, then renames it over `path`.

  Args:
    path: final file path.
    text: the content.
  """
  with atomic_path(path) as tmp, open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def write_json_atomic(path: str, obj: Any) -> None:
  """JSON version of write_text_atomic (indented, keys in insertion order).

  Args:
    path: final file path.
    obj: JSON-serialisable object.
  """
  write_text_atomic(path, json.dumps(obj, indent=2) + '\n')


def write_npy_atomic(path: str, array) -> None:
  """np.save of `array` to `path` (a .npy name) through a temporary beside it, renamed over it.

  Args:
    path: final file path, ending in .npy.
    array: the array.
  """
  with atomic_path(path, '.npy') as tmp:
    np.save(tmp, array)


# temp_path's names; also `.{name}.{random}.tmp` and `.{name}.tmp.npz`, which earlier versions
# wrote, so that a workdir a killed older run left behind is cleaned up as well.
_TEMPORARY = re.compile(r'^\..+(\.tmp-[0-9a-f]{12}(\.npy|\.npz)?|\.tmp|\.tmp\.npz)$')


def remove_stale_temporaries(
  folder: str, subfolders: tuple[str, ...] = (CACHE, BASELINES)
) -> list[str]:
  """Deletes temporaries a killed run left behind (never a file under a final name).

  Safe because one workdir is used by one run at a time (jule3d/lock.py: pipeline.run holds it).

  Args:
    folder: the workdir.
    subfolders: its subfolders that receive atomic writes too.

  Returns:
    The removed paths.
  """
  removed = []
  for where in (folder, *(os.path.join(folder, s) for s in subfolders)):
    if not os.path.isdir(where):
      continue
    for name in os.listdir(where):
      if _TEMPORARY.match(name):
        path = os.path.join(where, name)
        remove_path(path)
        removed.append(path)
  return removed
