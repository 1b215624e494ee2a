"""Small atomic file writers: a result on disk is either the old one or the new one, never half."""

import json
import os
import re
import shutil
import tempfile
from typing import Any

from jule3d.workdir import BASELINES, CACHE


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to a temporary file beside `path`, fsyncs it, then renames it over `path`.

  Args:
    path: final file path.
    text: the content.
  """
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=folder)
  try:
    # mkstemp creates 0600; results are meant to be read like any other file (umask applies).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    with os.fdopen(fd, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json_atomic(path: str, obj: Any) -> None:
  """JSON version of write_text_atomic (indented, keys in insertion order).

  Args:
    path: final file path.
    obj: JSON-serialisable object.
  """
  write_text_atomic(path, json.dumps(obj, indent=2) + '\n')


# The temporary names this package writes: `.{name}.{random}.tmp` (write_text_atomic),
# `.{name}.tmp-{hex}` (volume.temp_path) and `.{name}.tmp.npz` (features).
_TEMPORARY = re.compile(r'^\..+(\.tmp|\.tmp-[0-9a-f]+|\.tmp\.npz)$')


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
        if os.path.isdir(path) and not os.path.islink(path):
          shutil.rmtree(path, ignore_errors=True)
        else:
          os.unlink(path)
        removed.append(path)
  return removed
