"""SIGKILL at several moments of `--mode=all`, then the same command again: same result."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import ROOT, run_cli

from jule3d import lock, volume

CMD = ['--config=configs/smoke.py']
SEGMENT_FLAGS = ['--config.segment.part_planes=1']


def _kill_when(workdir: str, ready, flags=(), timeout: float = 300) -> bool:
  """Starts --mode=all, SIGKILLs it once ready(workdir) holds; True if it was killed mid-run."""
  proc = subprocess.Popen(
    [sys.executable, os.path.join(ROOT, 'launch.py'), *CMD, *flags, f'--workdir={workdir}'],
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + timeout
  while proc.poll() is None and not ready(workdir) and time.time() < deadline:
    time.sleep(0.02)
  killed = proc.poll() is None
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return killed


def _exists(*parts):
  return lambda w: bool(glob.glob(os.path.join(w, *parts)))


MOMENTS = {
  'sampling': _exists('phantom', 'phantom.json'),
  'between periods': _exists('train_history.json'),
  'training done': _exists('timings.json'),  # written when training ends: segmentation next
  # One grid plane per feature part (SEGMENT_FLAGS): killed once the first part is saved.
  'segmentation': _exists('.segment_progress', '*', 'part_*.npy'),
  'report': _exists('segmentation.nii.gz'),
}


@pytest.mark.parametrize('moment', list(MOMENTS))
def test_sigkill_then_rerun_gives_the_uninterrupted_result(smoke_run, tmp_path, moment):
  workdir = str(tmp_path / 'w')
  flags = SEGMENT_FLAGS if moment == 'segmentation' else []
  killed = _kill_when(workdir, MOMENTS[moment], flags)
  assert killed, f'the run ended before the {moment} moment was reached'
  # The killed run held the workdir's lock: the kernel released it, so the rerun is not blocked.
  assert os.path.exists(os.path.join(workdir, lock.LOCK))
  if moment == 'segmentation':  # the rerun finds the saved part and does not compute it again
    parts = glob.glob(os.path.join(workdir, '.segment_progress', '*', 'part_*.npy'))
    assert parts and all(os.path.getsize(p) > 0 for p in parts)
  run_cli(*CMD, *flags, f'--workdir={workdir}', check=True)
  assert not os.path.exists(os.path.join(workdir, '.segment_progress'))
  seg = [volume.open_volume(os.path.join(w, 'segmentation.zarr')) for w in (smoke_run, workdir)]
  np.testing.assert_array_equal(*(s.read((0, 0, 0), s.shape) for s in seg))
  with (
    open(os.path.join(workdir, 'report.json')) as f,
    open(os.path.join(smoke_run, 'report.json')) as g,
  ):
    assert json.load(f)['nmi'] == json.load(g)['nmi']
  # No partial file is left visible, under a final name or as a stale temporary.
  assert not glob.glob(os.path.join(workdir, '.*tmp*')), os.listdir(workdir)
