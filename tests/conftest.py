"""Shared fixtures: a trained smoke run (phase 1 once per session) and a CLI runner."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


@pytest.fixture(scope='session')
def smoke_run(tmp_path_factory):
  """A workdir where `--config=configs/smoke.py --mode=all` (train, segment, evaluate) completed."""
  workdir = str(tmp_path_factory.mktemp('smoke'))
  run_cli('--config=configs/smoke.py', f'--workdir={workdir}', check=True)
  return workdir
