"""Phase 1: the recurrent schedule end to end, checkpoints, resume after SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, run_cli

from configs import smoke
from jule3d import checkpoint, groups, model, objective, pipeline, segment, train
from jule3d.errors import UserError


def _history(workdir):
  with open(os.path.join(workdir, train.HISTORY)) as f:
    return json.load(f)


def _final_labels(workdir):
  mgr = checkpoint.manager(workdir, read_only=True)
  c = smoke.get_config()
  net = model.build_model(c.model)
  tx = objective.make_optimizer(c.train)
  like = objective.create_train_state(net, tx, jax.random.PRNGKey(0), c.patches.patch_size)
  _, data, meta = checkpoint.restore(mgr, mgr.latest_step(), like, c.patches.num_patches)
  return data['labels'], meta


def test_history_ends_at_c_with_the_extra_period(smoke_run):
  c = smoke.get_config()
  h = _history(smoke_run)
  periods = h['periods']
  assert [p['period'] for p in periods] == list(range(len(periods)))
  assert len(periods) >= 3  # several merge periods, then the extra one
  for p in periods:
    assert set(p) >= {
      'period',
      'clusters_start',
      'clusters_end',
      'merges',
      'epochs',
      'loss_mean',
      'seconds',
      'nmi_patches',
    }
    assert p['clusters_start'] - p['merges'] == p['clusters_end']
    assert p['epochs'] == c.train.epochs_per_period
    assert 0 <= p['nmi_patches'] <= 1
  for before, after in zip(periods, periods[1:], strict=False):
    assert after['clusters_start'] == before['clusters_end']
  assert periods[-2]['clusters_end'] == c.cluster.num_clusters
  assert periods[-1]['merges'] == 0 and periods[-1]['clusters_end'] == c.cluster.num_clusters
  assert 0 <= h['nmi_patches_raw'] <= 1
  # The check of the trained features' groups (train.tries acts on it; one try here: no 'tries').
  g = h['groups']
  assert g['k'] == c.segment.num_segments and 0 < g['unexplained_k'] < g['unexplained_k_minus_1']
  assert g['distinct'] == (g['ratio'] < 0.75 * g['continuum_ratio']) and 'tries' not in h
  assert 'groups_start' not in h  # one try (the smoke config): the start is not checked
  # Merges per period follow min(ceil(eta * Nc), Nc - C).
  for p in periods[:-1]:
    n = p['clusters_start']
    want = min(int(np.ceil(c.cluster.unfolding_rate * n - 1e-9)), n - c.cluster.num_clusters)
    assert p['merges'] == want


def test_checkpoint_is_restorable_and_complete(smoke_run):
  labels, meta = _final_labels(smoke_run)
  c = smoke.get_config()
  assert labels.shape == (c.patches.num_patches,)
  assert labels.max() + 1 == c.cluster.num_clusters
  assert meta['done'] and meta['std'] > 0
  assert meta['config']['patches']['patch_size'] == c.patches.patch_size
  assert meta['fingerprint'] == checkpoint.fingerprint(meta['config'], meta['data_identity'])


# Two epochs a period: the first checkpoint (after epoch 1 of period 0) comes before any period has
# ended, so a signal sent when it appears lands inside a period (in epoch 2).
TWO_EPOCHS = ['--config=configs/smoke.py', '--mode=train', '--config.train.epochs_per_period=2']


@pytest.fixture(scope='module')
def two_epochs_run(tmp_path_factory):
  """The uninterrupted --mode=train run of TWO_EPOCHS."""
  whole = str(tmp_path_factory.mktemp('whole'))
  run_cli(*TWO_EPOCHS, f'--workdir={whole}', check=True)
  return whole


def _signal_at_first_checkpoint(workdir: str, signum: int) -> subprocess.CompletedProcess:
  cmd = [sys.executable, os.path.join(ROOT, 'launch.py'), *TWO_EPOCHS, f'--workdir={workdir}']
  proc = subprocess.Popen(
    cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  )
  ckpts = os.path.join(workdir, 'checkpoints')

  def first_checkpoint():
    return os.path.isdir(ckpts) and any(n.isdigit() for n in os.listdir(ckpts))

  deadline = time.time() + 300
  while not first_checkpoint() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signum)
  _, stderr = proc.communicate()
  assert first_checkpoint(), 'training ended before the first checkpoint appeared'
  assert not os.path.exists(os.path.join(workdir, train.HISTORY)), 'stopped after a period'
  return subprocess.CompletedProcess(cmd, proc.returncode, '', stderr)


def _assert_same_training(workdir: str, whole: str) -> None:
  got, want = _history(workdir), _history(whole)
  for a, b in zip(got['periods'], want['periods'], strict=True):
    assert {k: v for k, v in a.items() if k != 'seconds'} == pytest.approx(
      {k: v for k, v in b.items() if k != 'seconds'}, rel=1e-6
    )
  np.testing.assert_array_equal(_final_labels(workdir)[0], _final_labels(whole)[0])


def test_resume_mid_period_after_sigkill_gives_the_uninterrupted_result(tmp_path, two_epochs_run):
  workdir = str(tmp_path / 'killed')
  _signal_at_first_checkpoint(workdir, signal.SIGKILL)
  run_cli(*TWO_EPOCHS, f'--workdir={workdir}', check=True)
  _assert_same_training(workdir, two_epochs_run)


def test_sigterm_mid_epoch_stops_cleanly_and_the_rerun_gives_the_uninterrupted_result(
  tmp_path, two_epochs_run
):
  workdir = str(tmp_path / 'stopped')
  stopped = _signal_at_first_checkpoint(workdir, signal.SIGTERM)
  assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
  last = stopped.stderr.strip().splitlines()[-1]
  assert last.startswith('stopped by SIGTERM') and 'rerun the same command' in last
  assert 'Traceback' not in stopped.stderr
  # Nothing half-written: only complete checkpoints, no orbax or jule3d temporaries.
  ckpts = os.listdir(os.path.join(workdir, 'checkpoints'))
  assert ckpts and all(n.isdigit() for n in ckpts), ckpts
  assert not [n for n in os.listdir(workdir) if 'tmp' in n]
  rerun = run_cli(*TWO_EPOCHS, f'--workdir={workdir}', check=True)
  assert 'resuming from checkpoint' in rerun.stderr
  _assert_same_training(workdir, two_epochs_run)


def test_a_different_config_is_not_resumed(smoke_run):
  proc = run_cli(
    '--config=configs/smoke.py',
    f'--workdir={smoke_run}',
    '--mode=train',
    '--config.train.margin=0.5',
  )
  assert proc.returncode == 2
  assert 'different config' in proc.stderr and 'Traceback' not in proc.stderr


def test_checkpoint_round_trip(tmp_path):
  c = smoke.get_config()
  net = model.build_model(c.model)
  tx = objective.make_optimizer(c.train)
  state = objective.create_train_state(net, tx, jax.random.PRNGKey(3), c.patches.patch_size)
  # Take one real step so the optimiser state is non-trivial.
  step = objective.make_train_step(net, tx, c.train)
  w = c.patches.patch_size
  batch = {
    'patches': jax.random.normal(jax.random.PRNGKey(0), (8, w, w, w)),
    'labels': jnp.array([0, 0, 1, 1, 2, 2, 3, 3], jnp.int32),
    'valid': jnp.ones(8, bool),
  }
  state, _ = step(state, batch)
  mgr = checkpoint.manager(str(tmp_path), keep=2)
  data = {
    'labels': np.arange(20, dtype=np.int32) % 3,
    'centres': np.arange(60, dtype=np.int32).reshape(20, 3),
  }
  checkpoint.save(mgr, 1, state, data, {'period': 1, 'mean': 1.5})
  like = objective.create_train_state(net, tx, jax.random.PRNGKey(9), w)
  restored, rdata, meta = checkpoint.restore(mgr, 1, like, 20)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for k in data:
    np.testing.assert_array_equal(rdata[k], data[k])
  assert meta == {'period': 1, 'mean': 1.5}
  for s in (2, 3, 4):
    checkpoint.save(mgr, s, state, data, {'period': s})
  assert mgr.all_steps() == [3, 4]  # pruned to keep_checkpoints


def test_epoch_batches_cover_every_sample_once():
  idx, valid = train.epoch_batches(23, 5, seed=0, period=1, epoch=2)
  assert idx.shape == valid.shape == (5, 5)
  assert sorted(idx[valid].tolist()) == list(range(23))
  again, _ = train.epoch_batches(23, 5, seed=0, period=1, epoch=2)
  other, _ = train.epoch_batches(23, 5, seed=0, period=1, epoch=3)
  np.testing.assert_array_equal(idx, again)
  assert not np.array_equal(idx, other)


def test_non_finite_loss_names_period_and_step():
  with pytest.raises(UserError, match='period 3 at step 12'):
    train._check_finite(np.array([0.5, 0.4, np.nan]), period=3, first_step=10)
  train._check_finite(np.array([0.5, 0.4]), period=0, first_step=0)


def test_features_that_collapse_are_one_user_error(tmp_path, monkeypatch):
  # All training patches with the same period-0 features (as a texture-less volume, or a CNN whose
  # embedding collapsed, gives): the library raises graph.DegenerateFeatures, and the training loop
  # turns it into a UserError (one line, exit 2) that says what to change.
  from jule3d import features, pipeline

  c = smoke.get_config()
  inputs = pipeline.resolve_inputs(c, str(tmp_path / 'w'), for_training=True)
  monkeypatch.setattr(
    features, 'initial_features', lambda c, data: np.ones((data.shape[0], 3), np.float32)
  )
  with pytest.raises(UserError, match='period 0') as info:
    train.train(inputs, str(tmp_path / 'w'))
  assert 'data.threshold' in str(info.value) and '\n' not in str(info.value)


def _tries_run(tmp_path, monkeypatch, ratios: dict, start: float = 0.20):
  """train.train with train.tries = 3 and the group check's ratio set: on the trained features per
  try seed (`ratios`), on the period-0 features to `start` (distinct below 0.33)."""
  real = groups.structure

  def structure(features, dist, seed, restarts, max_fit):
    found = real(features, dist, seed, restarts, max_fit)
    r = start if features.shape[1] == 1 else ratios.get(seed)  # the 'cue' start has one column
    if r is not None:
      found = {**found, 'ratio': r, 'distinct': r < 0.75 * found['continuum_ratio']}
    return found

  monkeypatch.setattr(groups, 'structure', structure)
  c = smoke.get_config()
  assert c.cluster.initial_features == 'cue'  # `structure` above tells the start by its one column
  c.train.tries = 3
  workdir = str(tmp_path / 'w')
  inputs = pipeline.resolve_inputs(c, workdir, for_training=True)
  return c, inputs, workdir, train.train(inputs, workdir)


def _params(mgr):
  c = smoke.get_config()
  like = train._initial_state(c)[2]
  state, _, meta = checkpoint.restore(mgr, mgr.latest_step(), like, c.patches.num_patches)
  return jax.tree.leaves(state.params), meta


def test_tries_keep_the_training_whose_features_hold_the_groups_best(tmp_path, monkeypatch):
  # No try holds 3 distinct groups (the continuum's ratio is 0.44, distinct below 0.33): all three
  # run, each from scratch with its own seed in tries/<t>, and the lowest ratio (try 1) is kept.
  c, inputs, workdir, h = _tries_run(tmp_path, monkeypatch, {0: 0.50, 1000: 0.40, 2000: 0.45})
  assert [(t['try'], t['seed'], t['ratio']) for t in h['tries']] == [
    (0, 0, 0.50),
    (1, 1000, 0.40),
    (2, 2000, 0.45),
  ]
  assert h['kept'] == 1 and h['groups']['ratio'] == 0.40 and _history(workdir) == h
  assert [t['workdir'] for t in h['tries']] == ['.', 'tries/1', 'tries/2']
  # The workdir's newest checkpoint is try 1's final model: what segmentation restores.
  kept, meta = _params(checkpoint.manager(workdir, read_only=True))
  tried, _ = _params(checkpoint.manager(os.path.join(workdir, 'tries', '1'), read_only=True))
  other, _ = _params(checkpoint.manager(os.path.join(workdir, 'tries', '2'), read_only=True))
  assert meta['seed'] == 1000 and meta['done'] and meta['history'] == h
  for a, b in zip(kept, tried, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(
    not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(kept, other, strict=True)
  )
  restored = jax.tree.leaves(segment.load_model(c, workdir)[1]['params'])
  for a, b in zip(restored, tried, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # Run again: nothing trains. Killed before the kept copy was saved: the tries are done, so the
  # same one is kept again without training.
  def no_training(run):
    raise AssertionError('trained again')

  monkeypatch.setattr(train, '_train_epochs', no_training)
  assert train.train(inputs, workdir) == h
  mgr = checkpoint.manager(workdir, read_only=True)
  newest = mgr.latest_step()
  shutil.rmtree(os.path.join(workdir, 'checkpoints', str(newest)))
  os.remove(os.path.join(workdir, train.HISTORY))
  assert train.train(inputs, workdir) == h
  again, _ = _params(checkpoint.manager(workdir, read_only=True))
  for a, b in zip(again, tried, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tries_stop_at_the_first_training_that_holds_the_groups(tmp_path, monkeypatch):
  _, _, workdir, h = _tries_run(tmp_path, monkeypatch, {0: 0.50, 1000: 0.20, 2000: 0.10})
  assert [t['ratio'] for t in h['tries']] == [0.50, 0.20] and h['kept'] == 1
  assert h['groups']['distinct'] and not os.path.exists(os.path.join(workdir, 'tries', '2'))


def test_one_try_whose_features_hold_the_groups_trains_once(tmp_path, monkeypatch):
  _, _, workdir, h = _tries_run(tmp_path, monkeypatch, {0: 0.20})
  assert 'tries' not in h and h['groups']['distinct']
  assert not os.path.exists(os.path.join(workdir, 'tries'))


def test_no_tries_where_the_period_0_features_hold_no_groups(tmp_path, monkeypatch):
  # The trained features do not hold the groups, but neither did the period-0 features (MNI152's
  # intensity, one curve): one training, as no other is expected to find them.
  c, _, workdir, h = _tries_run(tmp_path, monkeypatch, {0: 0.50, 1000: 0.20}, start=0.45)
  assert h['groups_start']['ratio'] == 0.45
  assert not h['groups_start']['distinct'] and not h['groups']['distinct']
  assert 'tries' not in h and not os.path.exists(os.path.join(workdir, 'tries'))
  assert _history(workdir) == h


def _drop_checks(c, workdir: str, step: int, keys: tuple[str, ...]) -> None:
  """Checkpoint `step` saved again without `keys` in its history (a run from before those checks)."""
  mgr = checkpoint.manager(workdir, read_only=True)
  like = train._initial_state(c)[2]
  state, arrays, meta = checkpoint.restore(mgr, step, like, c.patches.num_patches)
  history = {k: v for k, v in meta['history'].items() if k not in keys}
  shutil.rmtree(os.path.join(workdir, 'checkpoints', str(step)))
  own = checkpoint.manager(workdir, keep=c.train.keep_checkpoints)
  checkpoint.save(own, step, state, arrays, {**meta, 'history': history})


def test_runs_from_before_the_checks_get_them(tmp_path, monkeypatch):
  c, inputs, workdir, h = _tries_run(tmp_path, monkeypatch, {0: 0.50}, start=0.45)
  assert 'tries' not in h and not h['groups_start']['distinct']
  steps = sorted(checkpoint.manager(workdir, read_only=True).all_steps())
  real_epochs = train._train_epochs

  def no_training(run):
    raise AssertionError('trained again')

  monkeypatch.setattr(train, '_train_epochs', no_training)
  # Finished with train.tries = 1 (no start check), rerun with 3; then finished before both checks:
  # the checks are computed from the checkpoint, written to train_history.json, nothing trains.
  for keys in (('groups_start',), ('groups', 'groups_start')):
    _drop_checks(c, workdir, steps[-1], keys)
    os.remove(os.path.join(workdir, train.HISTORY))
    assert train.train(inputs, workdir) == h and _history(workdir) == h
  # Killed mid-training before the start check existed: resumed, it gets the check, and the tries
  # follow it (none here).
  monkeypatch.setattr(train, '_train_epochs', real_epochs)
  for step in steps[1:]:
    shutil.rmtree(os.path.join(workdir, 'checkpoints', str(step)))
  _drop_checks(c, workdir, steps[0], ('groups_start',))
  again = train.train(inputs, workdir)
  assert again['groups_start'] == h['groups_start'] and 'tries' not in again
  assert not os.path.exists(os.path.join(workdir, 'tries'))
