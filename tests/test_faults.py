"""The run folder under real-world faults: damaged checkpoints, a second run, a moved folder."""

import glob
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import ROOT, run_cli

from jule3d import checkpoint, lock, model, objective, volume
from jule3d.errors import UserError

CMD = ['--config=configs/smoke.py']


def _labels(workdir: str) -> np.ndarray:
  seg = volume.open_volume(os.path.join(workdir, 'segmentation.zarr'))
  return seg.read((0, 0, 0), seg.shape)


def _nmi(workdir: str) -> dict:
  with open(os.path.join(workdir, 'report.json')) as f:
    return json.load(f)['nmi']


def _steps(workdir: str) -> list[int]:
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())


def _copy_of(smoke_run: str, tmp_path, name: str = 'copy') -> str:
  """A copy of the finished smoke run in another folder, its outputs removed."""
  workdir = str(tmp_path / name)
  shutil.copytree(smoke_run, workdir, symlinks=True)
  for output in ('segmentation.zarr', 'segmentation.nii.gz', 'segmentation.nrrd', 'report.json'):
    path = os.path.join(workdir, output)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  return workdir


def _truncate_arrays(step_dir: str) -> int:
  """Cuts every array data file of one checkpoint to 10 bytes (a write that lost its tail)."""
  files = [f for f in glob.glob(os.path.join(step_dir, '**', 'd', '*'), recursive=True)]
  for f in files:
    os.truncate(f, 10)
  return len(files)


def test_a_copied_workdir_resumes_without_training_again(smoke_run, tmp_path):
  workdir = _copy_of(smoke_run, tmp_path)
  before = _steps(workdir)
  proc = run_cli(*CMD, f'--workdir={workdir}', check=True)
  assert 'training already complete' in proc.stderr
  assert _steps(workdir) == before
  np.testing.assert_array_equal(_labels(workdir), _labels(smoke_run))
  assert _nmi(workdir) == _nmi(smoke_run)


def test_other_data_under_the_same_path_is_refused(smoke_run, tmp_path):
  import tensorstore as ts

  workdir = _copy_of(smoke_run, tmp_path)
  image = os.path.join(workdir, 'phantom', 'image.zarr')
  store = ts.open({'driver': 'zarr', 'kvstore': {'driver': 'file', 'path': image}}).result()
  voxel = store[20, 18, 22].read().result()
  store[20, 18, 22].write(voxel + 1).result()  # one voxel of the scan changed, same path
  proc = run_cli(*CMD, '--mode=train', f'--workdir={workdir}')
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'different config or other data' in proc.stderr and 'Traceback' not in proc.stderr


def test_a_damaged_checkpoint_of_another_run_is_only_read(smoke_run, tmp_path):
  other = _copy_of(smoke_run, tmp_path, 'other')
  newest = _steps(other)[-1]
  _truncate_arrays(os.path.join(other, 'checkpoints', str(newest)))
  proc = run_cli(
    *CMD, '--mode=segment', f'--config.segment.checkpoint={other}', f'--workdir={tmp_path / "w"}'
  )
  # The finished model is the damaged one: segmenting with a half-trained one is refused.
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert f'checkpoint {newest} in' in proc.stderr and 'unfinished training' in proc.stderr
  assert _steps(other)[-1] == newest  # another run's folder is not changed
  assert not os.path.exists(os.path.join(other, checkpoint.DAMAGED_CHECKPOINTS))


def test_a_damaged_latest_checkpoint_falls_back_and_gives_the_uninterrupted_result(
  smoke_run, tmp_path
):
  workdir = _copy_of(smoke_run, tmp_path)
  newest = _steps(workdir)[-1]
  assert _truncate_arrays(os.path.join(workdir, 'checkpoints', str(newest)))
  proc = run_cli(*CMD, f'--workdir={workdir}', check=True)
  assert f'checkpoint {newest} in' in proc.stderr and 'cannot be restored' in proc.stderr
  assert 'Traceback' not in proc.stderr and 'Event loop is closed' not in proc.stderr
  # Set aside, not deleted; training ran again from the newest intact checkpoint.
  aside = os.listdir(os.path.join(workdir, checkpoint.DAMAGED_CHECKPOINTS))
  assert [n.split('-')[0] for n in aside] == [str(newest)]
  assert 'resuming from checkpoint' in proc.stderr
  np.testing.assert_array_equal(_labels(workdir), _labels(smoke_run))
  assert _nmi(workdir) == _nmi(smoke_run)


def test_no_intact_checkpoint_is_one_line_and_exit_2(smoke_run, tmp_path):
  workdir = _copy_of(smoke_run, tmp_path)
  steps = _steps(workdir)
  for step in steps:
    _truncate_arrays(os.path.join(workdir, 'checkpoints', str(step)))
  proc = run_cli(*CMD, '--mode=train', f'--workdir={workdir}')
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and '--overwrite' in errors[0], proc.stderr[-2000:]
  assert 'cannot be restored' not in proc.stderr  # the reason is in that line, not in warnings
  assert 'Traceback' not in proc.stderr
  assert _steps(workdir) == steps  # nothing is moved when there is nothing to fall back on


def test_a_second_run_on_the_same_workdir_is_refused_while_the_first_finishes(smoke_run, tmp_path):
  workdir = str(tmp_path / 'w')
  first = subprocess.Popen(
    [sys.executable, os.path.join(ROOT, 'launch.py'), *CMD, f'--workdir={workdir}'],
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  holder = os.path.join(workdir, lock.LOCK)
  deadline = time.time() + 120
  while first.poll() is None and time.time() < deadline:
    if os.path.exists(holder) and f'"pid": {first.pid}' in open(holder).read():
      break
    time.sleep(0.02)
  second = run_cli(*CMD, f'--workdir={workdir}')
  assert first.poll() is None, 'the first run ended before the second started'
  assert second.returncode == 2, second.stderr[-2000:]
  assert 'in use by another run' in second.stderr and f'pid {first.pid}' in second.stderr
  assert second.stderr.strip().count('\n') == 0  # one line
  assert first.wait(timeout=600) == 0
  np.testing.assert_array_equal(_labels(workdir), _labels(smoke_run))


def test_the_lock_refuses_a_second_holder_and_is_free_after(tmp_path):
  with lock.exclusive(str(tmp_path)) as locked:
    assert locked
    with pytest.raises(UserError, match=rf'in use by another run [(]pid {os.getpid()} on host'):
      with lock.exclusive(str(tmp_path)):
        pass
  with lock.exclusive(str(tmp_path)) as again:  # released with the block (as with its process)
    assert again


def test_a_filesystem_without_flock_warns_and_runs_unlocked(tmp_path, monkeypatch):
  import errno
  import fcntl

  def unsupported(fd, op):
    raise OSError(errno.ENOLCK, 'No locks available')

  monkeypatch.setattr(fcntl, 'flock', unsupported)
  warnings = []
  monkeypatch.setattr(lock.logging, 'warning', lambda msg, *a: warnings.append(msg % a))
  with lock.exclusive(str(tmp_path)) as locked:
    assert not locked
  assert len(warnings) == 1 and 'does not support flock' in warnings[0]


def test_identity_names_the_content_not_the_path(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  data = rng.integers(0, 4000, (30, 34, 38), dtype=np.uint16)
  first = str(tmp_path / 'a' / 'scan.npy')
  os.makedirs(os.path.dirname(first))
  np.save(first, data)
  moved = str(tmp_path / 'b' / 'renamed.npy')
  os.makedirs(os.path.dirname(moved))
  shutil.copy(first, moved)
  other = data.copy()
  other[29, 33, 37] += 1  # one voxel

  def ident(path, array=None):
    if array is not None:
      np.save(path, array)
    cache = str(tmp_path / 'cache')
    return volume.identity(volume.open_volume(path, cache_dir=cache, spacing=(0.5, 0.5, 0.5)))

  config = {'seed': 0, 'data': {'path': first, 'threshold': 1.0}, 'model': {}}
  moved_config = {**config, 'data': {**config['data'], 'path': moved}}
  a, b = ident(first), ident(moved)
  assert a == b
  assert checkpoint.fingerprint(config, a) == checkpoint.fingerprint(moved_config, b)
  assert checkpoint.fingerprint(config) != checkpoint.fingerprint(moved_config)  # by path
  changed = ident(str(tmp_path / 'a' / 'other.npy'), other)
  assert changed != a
  assert checkpoint.fingerprint(config, changed) != checkpoint.fingerprint(config, a)
  # Beyond the whole-volume size only boxes are hashed: a change inside one is seen, geometry too.
  monkeypatch.setattr(volume.integrity, '_IDENTITY_WHOLE_VOXELS', 1000)
  assert ident(first) != a  # hashed another way
  assert ident(first) == ident(moved)
  assert ident(str(tmp_path / 'a' / 'other.npy')) != ident(first)  # the last voxel is in a box
  respaced = volume.open_volume(first, cache_dir=str(tmp_path / 'c2'), spacing=(0.5, 0.5, 0.6))
  assert volume.identity(respaced) != ident(first)


def test_a_checkpoint_whose_arrays_fail_their_digest_is_set_aside(tmp_path):
  from configs import smoke

  c = smoke.get_config()
  net = model.build_model(c.model)
  tx = objective.make_optimizer(c.train)
  state = objective.create_train_state(net, tx, jax.random.PRNGKey(0), c.patches.patch_size)
  data = {'labels': np.zeros(4, np.int32), 'centres': np.zeros((4, 3), np.int32)}
  mgr = checkpoint.manager(str(tmp_path), keep=3)
  for step in (1, 2):
    checkpoint.save(mgr, step, state, data, {'period': step})
  meta_file = os.path.join(str(tmp_path), 'checkpoints', '2', 'meta', 'metadata')
  with open(meta_file) as f:
    meta = json.load(f)
  meta['arrays_sha256'] = '0' * 64  # as if one array had read back other numbers
  with open(meta_file, 'w') as f:
    json.dump(meta, f)

  def load(step):
    return checkpoint.restore(mgr, step, state, 4)

  step, (_, _, restored) = checkpoint.newest_intact(mgr, load, set_aside=True)
  assert step == 1 and restored == {'period': 1}
  assert mgr.all_steps() == [1]
  assert os.listdir(os.path.join(str(tmp_path), checkpoint.DAMAGED_CHECKPOINTS))[0].startswith('2-')
  with pytest.raises(checkpoint.NoIntactCheckpoint, match='none of the 1 checkpoints'):
    checkpoint.newest_intact(mgr, lambda s: 1 / 0, set_aside=True)


def test_a_stop_signal_waits_for_a_deferred_section_then_stops():
  import signal

  from jule3d import interrupt

  previous = {s: signal.getsignal(s) for s in interrupt.SIGNALS}
  interrupt.install()
  try:
    finished = False
    with pytest.raises(interrupt.Stopped) as stopped:
      with interrupt.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler has run by now: held, not raised
        finished = True
    assert finished and stopped.value.name == 'SIGTERM'
    with pytest.raises(interrupt.Stopped):  # outside a deferred section: at once
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
    with interrupt.deferred():  # nothing pending any more
      pass
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
