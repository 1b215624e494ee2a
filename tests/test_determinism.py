"""Same config, seed and machine -> the same run: labels, training history and scores, exactly.

One run comes from the session fixture `smoke_run`, the other is made here in a fresh workdir; both
are the full `--mode=all` command line. Only wall-clock fields (seconds, dates, paths) may differ.
"""

import json
import os

import numpy as np
from helpers import run_cli

from jule3d import volume

SMOKE = '--config=configs/smoke.py'
_CLOCK = {'seconds'}  # per-period wall time: the only train_history field allowed to differ


def _history(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'train_history.json')) as f:
    periods = json.load(f)['periods']
  return [{k: v for k, v in p.items() if k not in _CLOCK} for p in periods]


def _report(workdir: str) -> dict:
  with open(os.path.join(workdir, 'report.json')) as f:
    return json.load(f)


def _labels(workdir: str) -> np.ndarray:
  seg = volume.open_volume(os.path.join(workdir, 'segmentation.zarr'), name='segmentation')
  return seg.read((0, 0, 0), seg.shape)


def test_two_runs_of_the_same_config_are_identical(smoke_run, tmp_path):
  again = str(tmp_path / 'again')
  run_cli(SMOKE, f'--workdir={again}', check=True)

  first, second = _labels(smoke_run), _labels(again)
  assert first.shape == second.shape and first.dtype == second.dtype == np.uint8
  assert len(np.unique(first)) > 1  # a real segmentation, not an empty volume twice
  np.testing.assert_array_equal(first, second)
  with open(os.path.join(smoke_run, 'segmentation.nii.gz'), 'rb') as a:
    with open(os.path.join(again, 'segmentation.nii.gz'), 'rb') as b:
      assert a.read() == b.read()  # no name or time in the gzip header: the same bytes

  history = _history(smoke_run)
  assert len(history) >= 2
  assert history == _history(again)  # cluster counts, merges, losses, patch NMIs: exactly equal

  r1, r2 = _report(smoke_run), _report(again)
  for key in ('nmi', 'dice', 'matching', 'uncovered_fraction', 'annotated_voxels'):
    assert r1[key] == r2[key], key
