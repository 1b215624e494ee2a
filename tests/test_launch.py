"""The command line as a user meets it: later modes on an empty workdir say what to run first.

The catalogue of bad inputs (one line, exit 2, no traceback, no files) is tests/test_bad_inputs.py.
"""

import os

import pytest
from helpers import ROOT, run_cli

SMOKE = '--config=configs/smoke.py'


@pytest.mark.parametrize('mode', ['segment', 'evaluate'])
def test_later_modes_on_an_empty_workdir_say_what_to_run_first(tmp_path, mode):
  proc = run_cli(SMOKE, f'--workdir={tmp_path}', f'--mode={mode}')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert '--mode=' in proc.stderr.splitlines()[-1]


# The disk fills up while the run writes its training record: syncing a train_history temporary
# under the workdir fails with ENOSPC, as on a full disk (where write, flush or fsync fail).
_FULL_DISK = """
import errno, os
_real_fsync = os.fsync
def _fsync(fd):
  name = os.readlink(f'/proc/self/fd/{fd}')
  if name.startswith(os.environ['FULL_DISK_DIR']) and 'train_history' in name:
    raise OSError(errno.ENOSPC, 'No space left on device', name)
  return _real_fsync(fd)
os.fsync = _fsync
"""


def test_a_disk_filling_up_mid_run_gives_one_line_and_the_rerun_finishes(tmp_path, monkeypatch):
  workdir = tmp_path / 'w'
  site = tmp_path / 'site'
  site.mkdir()
  (site / 'sitecustomize.py').write_text(_FULL_DISK)
  monkeypatch.setenv('PYTHONPATH', str(site))
  monkeypatch.setenv('FULL_DISK_DIR', str(workdir))
  proc = run_cli(SMOKE, f'--workdir={workdir}', '--mode=train')
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert lines[-1].startswith('error: no space left') and 'rerun the same command' in lines[-1]
  assert not (workdir / 'train_history.json').exists()
  monkeypatch.delenv('PYTHONPATH')
  proc = run_cli(SMOKE, f'--workdir={workdir}', '--mode=train', check=True)
  assert (workdir / 'train_history.json').exists()


def test_threshold_otsu_from_the_command_line_is_resolved_and_logged(tmp_path):
  # 'otsu' parses as a string, passes validation and becomes a number once the image is open
  # (then --mode=segment on an empty workdir stops, as it should, at the missing checkpoint).
  proc = run_cli(SMOKE, f'--workdir={tmp_path}', '--mode=segment', '--config.data.threshold=otsu')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  logged = [
    line for line in proc.stderr.splitlines() if 'foreground: config.data.threshold' in line
  ]
  assert len(logged) == 1 and '(otsu' in logged[0] and '% of the volume' in logged[0], logged
  assert 'no checkpoint' in proc.stderr.splitlines()[-1]


def test_a_threshold_string_other_than_otsu_is_one_line(tmp_path):
  proc = run_cli(SMOKE, f'--workdir={tmp_path / "w"}', '--config.data.threshold=median')
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert lines[-1].startswith("error: config.data.threshold = 'median'") and "'otsu'" in lines[-1]
  assert not (tmp_path / 'w').exists()


# A bug inside the library (here: cluster labels that skip a value, as a broken renumbering would
# leave them) must reach the user as a traceback, not be dressed up as a one-line input error.
_BROKEN_RENUMBER = """
import jule3d.graph as graph
_real = graph.renumber
graph.renumber = lambda labels: _real(labels) * 2
"""


def test_an_internal_bug_is_a_traceback_not_a_user_error(tmp_path, monkeypatch):
  site = tmp_path / 'site'
  site.mkdir()
  (site / 'sitecustomize.py').write_text(_BROKEN_RENUMBER)
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join([str(site), ROOT]))
  proc = run_cli(SMOKE, f'--workdir={tmp_path / "w"}', '--mode=train')
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert 'Traceback' in proc.stderr and 'ValueError: merge_period' in proc.stderr
  assert not proc.stderr.strip().splitlines()[-1].startswith('error:')
