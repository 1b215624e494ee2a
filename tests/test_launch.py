"""The command line as a user meets it: later modes on an empty workdir say what to run first.

The catalogue of bad inputs (one line, exit 2, no traceback, no files) is tests/test_bad_inputs.py.
"""

import pytest
from conftest import run_cli

SMOKE = '--config=configs/smoke.py'


@pytest.mark.parametrize('mode', ['segment', 'evaluate'])
def test_later_modes_on_an_empty_workdir_say_what_to_run_first(tmp_path, mode):
  proc = run_cli(SMOKE, f'--workdir={tmp_path}', f'--mode={mode}')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert '--mode=' in proc.stderr.splitlines()[-1]
