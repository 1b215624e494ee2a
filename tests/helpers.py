"""Helpers the tests share (imported as `from helpers import ...`; fixtures live in conftest.py)."""

import os
import subprocess
import sys
import types

import numpy as np
import tensorstore as ts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def memory_volume(array: np.ndarray):
  """An in-memory stand-in for jule3d.volume.Volume: the patch and grid code need only .store,
  .shape and .dtype."""
  return types.SimpleNamespace(store=ts.array(array), shape=array.shape, dtype=array.dtype)


def run_cli(*args: str, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
  """Runs launch.py as a user would; returns the completed process (text output)."""
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, 'launch.py'), *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  if check and proc.returncode != 0:
    raise AssertionError(f'launch.py {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
  return proc


# Runs compared across device or process counts: their features differ in the last bits (another
# summation order), and the Potts smoothing turns such a difference at a near-tie of its energy into
# a flipped grid block (measured: 1 of 49 smoke grid points at a 0.005 energy gap), so they are
# compared voxel for voxel with the smoothing off; the k-means labels have to agree exactly.
NO_SMOOTHING = '--config.segment.smoothing=0'


def one_process_segmentation(smoke_run: str, workdir: str, *flags: str):
  """The labels of smoke_run's checkpoint segmented again by one process with `flags`."""
  from jule3d import volume
  from jule3d.workdir import SEGMENTATION

  run_cli(
    '--config=configs/smoke.py', f'--workdir={workdir}', '--mode=segment',
    f'--config.segment.checkpoint={smoke_run}', *flags, check=True,
  )  # fmt: skip
  seg = volume.open_volume(os.path.join(workdir, SEGMENTATION))
  return seg.read((0, 0, 0), seg.shape)
