"""The command line as a user meets it: bad inputs give one line, exit 2, no traceback, no files."""

import os

import numpy as np
import pytest
from conftest import run_cli

SMOKE = '--config=configs/smoke.py'


def _vol(tmp_path, arr, name='vol.npy'):
  path = str(tmp_path / name)
  np.save(path, arr)
  return path


def _cases(tmp_path):
  rng = np.random.default_rng(0)
  good = rng.integers(1000, 5000, (30, 30, 30)).astype(np.uint16)
  nan = good.astype(np.float32)
  nan[3, 4, 5] = np.nan
  corrupt = tmp_path / 'broken.nii.gz'
  corrupt.write_bytes(b'\x1f\x8b\x08\x00 not really gzip')
  unsupported = tmp_path / 'scan.xyz'
  unsupported.write_text('hello')
  return {
    'missing path': ([f'--config.data.path={tmp_path}/nope.nii.gz'], 'nope.nii.gz'),
    'unsupported extension': ([f'--config.data.path={unsupported}'], '.xyz'),
    'corrupt file': ([f'--config.data.path={corrupt}'], 'broken.nii.gz'),
    '2D image': ([f'--config.data.path={_vol(tmp_path, good[0], "2d.npy")}'], '2d.npy'),
    '4D image': (
      [f'--config.data.path={_vol(tmp_path, np.stack([good, good], -1), "4d.npy")}'],
      '4d.npy',
    ),
    'smaller than a patch': (
      [f'--config.data.path={_vol(tmp_path, good[:10], "small.npy")}'],
      'patch',
    ),
    'too few centres': (
      [f'--config.data.path={_vol(tmp_path, good)}', '--config.data.threshold=4990'],
      'num_patches = 240',
    ),
    'NaN voxels': ([f'--config.data.path={_vol(tmp_path, nan, "nan.npy")}'], 'nan.npy'),
    'unknown config field': (['--config.train.epochz=3'], 'epochz'),
    'zero patch size': (['--config.patches.patch_size=0'], 'patches.patch_size'),
    'negative stride': (['--config.segment.stride=-5'], 'segment.stride'),
    'stride larger than the patch': (['--config.segment.stride=17'], 'segment.stride'),
    'even patch size': (['--config.patches.patch_size=14'], 'odd'),
    'C >= n_s': (['--config.cluster.num_clusters=240'], 'cluster.num_clusters'),
    'K < 2': (['--config.segment.num_segments=1'], 'segment.num_segments'),
    'eta outside (0, 1]': (['--config.cluster.unfolding_rate=1.5'], 'unfolding_rate'),
    'wrong type': (['--config.train.epochs_per_period=abc'], 'epochs_per_period'),
    'unknown mode': (['--mode=fly'], 'mode'),
  }


def test_bad_inputs_one_line_exit_2_nothing_written(tmp_path):
  cases = _cases(tmp_path)
  failures = []
  for name, (args, needle) in cases.items():
    workdir = tmp_path / f'work_{len(failures)}_{name.replace(" ", "_")}'
    proc = run_cli(SMOKE, f'--workdir={workdir}', *args, timeout=120)
    err = proc.stderr.strip().splitlines()
    last = err[-1] if err else ''
    problems = []
    if proc.returncode != 2:
      problems.append(f'exit {proc.returncode}')
    if 'Traceback' in proc.stderr:
      problems.append('traceback')
    if needle not in proc.stderr:
      problems.append(f'{needle!r} not named')
    if not any(line.startswith(('error:', 'FATAL Flags parsing error')) for line in err):
      problems.append(f'no error line: {last!r}')
    if workdir.exists() and any(workdir.iterdir()):
      problems.append(f'wrote {sorted(os.listdir(workdir))}')
    if problems:
      failures.append(f'{name}: {problems}; stderr tail: {proc.stderr[-300:]!r}')
  assert not failures, '\n'.join(failures)
  assert len(cases) >= 18


@pytest.mark.parametrize('mode', ['segment', 'evaluate'])
def test_later_modes_on_an_empty_workdir_say_what_to_run_first(tmp_path, mode):
  proc = run_cli(SMOKE, f'--workdir={tmp_path}', f'--mode={mode}')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert '--mode=' in proc.stderr.splitlines()[-1]
