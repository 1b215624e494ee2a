"""Atomic writers and the clean-up of temporaries left by a killed run."""

import json
import os

from jule3d import files


def test_atomic_json_replaces_whole_file_and_is_readable(tmp_path):
  path = str(tmp_path / 'a.json')
  files.write_json_atomic(path, {'x': 1})
  files.write_json_atomic(path, {'x': 2})
  with open(path) as f:
    assert json.load(f) == {'x': 2}
  assert os.listdir(tmp_path) == ['a.json']
  assert os.stat(path).st_mode & 0o044  # not 0600 like mkstemp: results are shared files


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
  keep = ['train_history.json', 'segmentation.zarr', '.hidden', 'notes.tmp.txt']
  stale = [
    '.train_history.json.jjr7a59t.tmp',
    '.segmentation.zarr.tmp-0123456789ab',
    '.features.npz.tmp.npz',
  ]
  for name in keep + stale:
    (tmp_path / name).write_text('x')
  (tmp_path / 'cache').mkdir()
  (tmp_path / 'cache' / '.vol.zarr.tmp-abcdef012345').mkdir()
  (tmp_path / 'cache' / 'vol.zarr').mkdir()
  removed = files.remove_stale_temporaries(str(tmp_path))
  assert sorted(os.path.basename(p) for p in removed) == sorted(
    stale + ['.vol.zarr.tmp-abcdef012345']
  )
  assert sorted(os.listdir(tmp_path)) == sorted(keep + ['cache'])
  assert os.listdir(tmp_path / 'cache') == ['vol.zarr']
