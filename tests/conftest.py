"""Shared fixtures: a trained smoke run (phase 1 once per session); helpers are in helpers.py."""

import pytest
from helpers import run_cli


@pytest.fixture(scope='session')
def smoke_run(tmp_path_factory):
  """A workdir where `--config=configs/smoke.py --mode=all` (train, segment, evaluate) completed."""
  workdir = str(tmp_path_factory.mktemp('smoke'))
  run_cli('--config=configs/smoke.py', f'--workdir={workdir}', check=True)
  return workdir
