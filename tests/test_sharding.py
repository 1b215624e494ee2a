"""Multi-device data parallelism, simulated on CPU with 4 host devices."""

import json
import os
import subprocess
import sys

import numpy as np
from conftest import ROOT

from jule3d import volume

FOUR = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')


def test_batches_are_split_over_four_devices():
  code = (
    'import jax, numpy as np\n'
    'from jule3d import sharding\n'
    'm = sharding.mesh(); x = sharding.put_batch(np.zeros((40, 3)), m)\n'
    'print(jax.device_count(), len(x.addressable_shards), x.addressable_shards[0].data.shape[0],\n'
    '      len(sharding.put_batch(np.zeros((6, 3)), m).sharding.device_set))\n'
  )
  out = subprocess.run(
    [sys.executable, '-c', code], cwd=ROOT, env=FOUR, capture_output=True, text=True, check=True
  ).stdout.split()
  # 4 devices, 4 shards of 10 rows; a batch of 6 (not divisible) is replicated on all 4.
  assert out == ['4', '4', '10', '4']


def test_one_and_four_devices_give_the_same_run(smoke_run, tmp_path):
  workdir = str(tmp_path / 'four')
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, 'launch.py'),
      '--config=configs/smoke.py',
      f'--workdir={workdir}',
    ],
    cwd=ROOT,
    env=FOUR,
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]

  def history(w):
    with open(os.path.join(w, 'train_history.json')) as f:
      return json.load(f)['periods']

  one, four = history(smoke_run), history(workdir)
  assert [p['clusters_end'] for p in one] == [p['clusters_end'] for p in four]
  np.testing.assert_allclose(
    [p['loss_mean'] for p in four], [p['loss_mean'] for p in one], rtol=1e-4
  )
  seg = [volume.open_volume(os.path.join(w, 'segmentation.zarr')) for w in (smoke_run, workdir)]
  a, b = (s.read((0, 0, 0), s.shape) for s in seg)
  np.testing.assert_array_equal(a, b)
