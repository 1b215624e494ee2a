"""Multi-host: two local processes joined by jax.distributed (CPU, gloo) run the smoke pipeline.

Each process has one CPU device; together they form a 2-device mesh. Each reads only its half of
the training patches, the segmentation grid parts alternate between them, and the primary writes
the outputs. The result must equal the one-process run.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
from helpers import NO_SMOOTHING, ROOT, one_process_segmentation

from jule3d import volume

# One grid plane per part on the per-patch path, so that both processes get parts.
FLAGS = [
  '--config.segment.part_planes=1',
  '--config.segment.feature_path=per_patch',
  NO_SMOOTHING,
]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _start_two(workdir: str, stderr=subprocess.PIPE) -> list[subprocess.Popen]:
  port = _free_port()
  return [
    subprocess.Popen(
      [
        sys.executable,
        os.path.join(ROOT, 'launch.py'),
        '--config=configs/smoke.py',
        f'--workdir={workdir}',
        *FLAGS,
        f'--config.distributed.coordinator=localhost:{port}',
        '--config.distributed.num_processes=2',
        f'--config.distributed.process_id={i}',
      ],
      cwd=ROOT,
      env=dict(os.environ, PYTHONUNBUFFERED='1'),
      stdout=subprocess.DEVNULL,
      stderr=stderr,
      text=True,
    )
    for i in range(2)
  ]


def _run_two(workdir: str, timeout: float = 400) -> list[str]:
  procs = _start_two(workdir)
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=timeout)[1])
  finally:
    for p in procs:
      p.kill()
  for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
    assert p.returncode == 0, f'process {i} failed ({p.returncode}):\n{log[-3000:]}'
  return logs


def test_two_processes_share_the_work_and_give_the_one_process_result(smoke_run, tmp_path):
  workdir = str(tmp_path / 'w')
  logs = _run_two(workdir)
  for i, log in enumerate(logs):
    assert f'process {i} of 2: 1 local of 2 devices' in log
    # Each process reads only its half of the training patches ...
    assert f'process {i} reads its 120 of the 240 training patches' in log
  # ... and computes its own parts of the segmentation grid (part i % 2 == process id).
  parts = [{int(n) for n in re.findall(r'feature part (\d+):', log)} for log in logs]
  assert parts[0] and parts[1] and not parts[0] & parts[1]
  assert all(n % 2 == i for i, ps in enumerate(parts) for n in ps)
  seg = volume.open_volume(os.path.join(workdir, 'segmentation.zarr'))
  one = one_process_segmentation(smoke_run, str(tmp_path / 'one'), *FLAGS)
  np.testing.assert_array_equal(seg.read((0, 0, 0), seg.shape), one)
  assert os.path.exists(os.path.join(workdir, 'report.json'))
  assert not os.path.exists(os.path.join(workdir, '.segment_progress'))


def test_two_processes_killed_between_periods_resume_to_the_same_result(smoke_run, tmp_path):
  workdir = tmp_path / 'w'
  procs = _start_two(str(workdir), stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (workdir / 'train_history.json').exists() and time.time() < deadline:
    assert all(p.poll() is None for p in procs), 'a process ended before the first period'
    time.sleep(0.02)
  for p in procs:
    p.send_signal(signal.SIGKILL)
    p.wait()
  assert not (workdir / 'segmentation.zarr').exists()
  logs = _run_two(str(workdir))
  assert 'resuming from checkpoint' in logs[0]
  seg = volume.open_volume(os.path.join(workdir, 'segmentation.zarr'))
  one = one_process_segmentation(smoke_run, str(tmp_path / 'one'), *FLAGS)
  np.testing.assert_array_equal(seg.read((0, 0, 0), seg.shape), one)
