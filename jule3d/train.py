"""Phase 1, the recurrent JULE schedule (method §3-4): merge, train, repeat; then a last training.

Period 0 clusters hand-made features of the normalised patches (config.cluster.initial_features,
jule3d/descriptors.py; the paper's L2-normalised raw voxels by default), starting from the 1-NN
components; every later period clusters fresh CNN features (eval-mode BatchNorm). Each period merges
min(ceil(eta * Nc), Nc - C) times and then trains the CNN `epochs_per_period` epochs on the labels.
After the period that reaches C clusters, one more training period runs on the final labels
(Moriya's extension; `merges` = 0 in the history).

Resume precedence (what `--mode=train` does in a workdir):
  1. checkpoints there with the same fingerprint (the phase-1 config and the data's content,
     checkpoint.fingerprint): resume from the newest one that restores intact (a finished run is
     left as it is); newer damaged ones are moved to damaged_checkpoints/ (checkpoint.newest_intact);
  2. checkpoints from a different config or other data, or none intact: refuse, unless
     --overwrite, which deletes them first;
  3. no checkpoint: start from scratch.
A checkpoint is written after every epoch (named by the global SGD step), so a crash costs at most
one epoch; within a period, training resumes at the next epoch with the period's labels. The
training patches are re-read from their saved centres (cheap), so a checkpoint does not hold them.

Tries (train.tries > 1, an extension): a training whose final features of the training patches do
not hold K = segment.num_segments distinct groups (groups.structure: the check the segmentation
logs, here on the training patches) although its period-0 features did (the same check, history
'groups_start') has lost groups that were there; it is followed by another, from scratch with
another seed (try_seed), in WORKDIR/tries/<t>/ (a workdir of its own, resumable the same way), until
one holds K groups or train.tries have run. The try whose features come closest (the lowest ratio)
is kept: its final checkpoint is saved again as the newest in WORKDIR/checkpoints/, which
segmentation and any later run restore, with the tries in its history. Where the period-0 features
hold no K groups (MNI152's intensity is one curve) no training has been seen to find them, so one
runs. One try (the paper) trains as before.
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from sklearn.metrics import normalized_mutual_info_score

from jule3d import (
  checkpoint,
  features,
  files,
  graph,
  groups,
  merge,
  model,
  objective,
  progress,
  samples,
  sharding,
  volume,
)
from jule3d.errors import UserError
from jule3d.workdir import HISTORY, TRIES


def patch_nmi(truth: np.ndarray | None, labels: np.ndarray) -> float | None:
  """NMI (geometric) of cluster labels against the reference at annotated training centres.

  Args:
    truth: reference label per patch (0 = not annotated) or None.
    labels: cluster label per patch.

  Returns:
    The NMI, or None when there is no reference (or fewer than 2 annotated patches).
  """
  if truth is None:
    return None
  keep = truth > 0
  if keep.sum() < 2:
    return None
  return float(normalized_mutual_info_score(truth[keep], labels[keep], average_method='geometric'))


def _cluster_kwargs(c) -> dict[str, Any]:
  cl = c.cluster
  return dict(k_s=cl.k_s, k_c=cl.k_c, a=cl.a, lam=cl.lam)


@contextlib.contextmanager
def _clustering(period: int):
  """Turns features that leave nothing to cluster into one actionable line for the user."""
  try:
    yield
  except graph.DegenerateFeatures as e:
    what = (
      'the period-0 features of the training patches (cluster.initial_features) are all the same: '
      'the patches carry no texture to tell apart (check data.threshold and data.path)'
      if period == 0
      else "the CNN's features of the training patches collapsed to one point: a narrow CNN needs "
      'a larger model.init_std (configs/demo.py explains why), or a smaller train.learning_rate'
    )
    raise UserError(f'clustering at period {period}: {what} ({e})') from None


def make_epoch_step(net, tx, train_cfg, m=None):
  """Jitted step that gathers the batch on the device from the resident patches (no host copy).

  Args:
    net: the JuleCNN.
    tx: the optimiser.
    train_cfg: config.train.
    m: the device mesh (default: all devices); the gathered batch is split over it.

  Returns:
    fn(state, all_patches, all_labels, idx[B], valid[B]) -> (state, metrics).
  """
  step = objective.make_train_step(net, tx, train_cfg)
  split = sharding.batch_sharding(m or sharding.mesh(), train_cfg.batch_size)

  @functools.partial(jax.jit, out_shardings=split)
  def gather(all_patches, all_labels, idx, valid):
    return {'patches': all_patches[idx], 'labels': all_labels[idx], 'valid': valid}

  def fn(state, all_patches, all_labels, idx, valid):
    return step(state, gather(all_patches, all_labels, idx, valid))

  return fn


def epoch_batches(n: int, batch_size: int, seed: int, period: int, epoch: int):
  """A fresh seeded permutation split into batches; the last one padded (valid mask).

  Args:
    n: number of samples.
    batch_size: B.
    seed: run seed.
    period: period index.
    epoch: epoch index within the period.

  Returns:
    (idx [num_batches, B] int32, valid [num_batches, B] bool).
  """
  perm = np.random.default_rng([seed, 1, period, epoch]).permutation(n).astype(np.int32)
  num = math.ceil(n / batch_size)
  idx = np.zeros(num * batch_size, np.int32)
  idx[:n] = perm
  valid = np.zeros(num * batch_size, bool)
  valid[:n] = True
  return idx.reshape(num, batch_size), valid.reshape(num, batch_size)


def _check_finite(losses: np.ndarray, period: int, first_step: int) -> None:
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    raise UserError(
      f'training diverged: non-finite loss in period {period} at step {first_step + int(bad[0])}; '
      'the last good checkpoint is kept. Lower config.train.learning_rate or check the input '
      '(constant or extreme intensities).'
    )


class _OtherConfig(UserError):
  """The workdir's checkpoints were trained with another phase-1 config or other data."""


def _open_run(inputs, workdir: str, fp: str, overwrite: bool, state_like, m):
  """This workdir's checkpoint manager and the newest intact checkpoint of this config, if any.

  Returns:
    (manager, (step, (state, saved, meta)) or None).
  """
  c = inputs.config
  keep, n_s = c.train.keep_checkpoints, c.patches.num_patches
  # Checkpoints written before the fingerprint named the data by content (it hashed data.path).
  legacy = checkpoint.fingerprint(c.to_dict())
  mgr = checkpoint.manager(workdir, keep=keep)

  def load(step: int):
    meta = checkpoint.read_meta(mgr, step)
    if meta.get('fingerprint') not in (fp, legacy):
      raise _OtherConfig(
        f'{workdir!r} holds checkpoints of a different config or other data (fingerprint '
        f'{meta.get("fingerprint")}, this run {fp}): use another --workdir, or --overwrite to '
        'delete them and start over.'
      )
    return checkpoint.restore(mgr, step, state_like, n_s, sharding.replicated(m))

  try:
    found = checkpoint.newest_intact(mgr, load, set_aside=sharding.is_primary())
    sharding.barrier('jule3d-checkpoints-checked')
    mgr.reload()  # the primary may have moved damaged checkpoints away
    return mgr, found
  except (_OtherConfig, checkpoint.NoIntactCheckpoint):
    if not overwrite:
      raise
  logging.warning('--overwrite: deleting the checkpoints in %s', workdir)
  if sharding.is_primary():
    shutil.rmtree(checkpoint.checkpoint_dir(workdir))
  sharding.barrier('jule3d-overwrite-checkpoints')
  return checkpoint.manager(workdir, keep=keep), None


@dataclasses.dataclass
class _Run:
  """One training run as it goes: what each step reads and updates, and each checkpoint saves."""

  c: ml_collections.ConfigDict
  workdir: str
  fp: str  # the config's and the data's fingerprint (checkpoint.fingerprint)
  data_id: str  # volume.identity of the input
  mgr: Any  # the checkpoint manager
  m: Any  # the device mesh
  embed_fn: Any
  epoch_step: Any
  data: samples.TrainingData
  state: Any  # objective.TrainState, replicated over the mesh
  labels: np.ndarray | None  # cluster label per training patch (None before period 0)
  period: int
  # Progress inside the current period: {'start', 'merges', 'epochs_done', ...}; None between.
  partial: dict | None
  history: dict
  initial: np.ndarray | None = None  # period-0 features, when the no-learning reference has them
  t0: float = 0.0  # start of the period's time not yet added to partial['seconds']


def train(inputs, workdir: str, overwrite: bool = False) -> dict:
  """Runs (or resumes) phase 1 and returns the training history.

  Args:
    inputs: pipeline.Inputs.
    workdir: run directory (checkpoints/, train_history.json; tries/ with train.tries > 1).
    overwrite: delete checkpoints of a different config instead of refusing.

  Returns:
    The history dict written to train_history.json (the kept try's, with 'tries' when more than
    one ran).
  """
  c = inputs.config
  history = _train_once(inputs, workdir, overwrite)
  if c.train.tries <= 1 or 'tries' in history or history['groups']['distinct']:
    return history
  if not history['groups_start']['distinct']:
    logging.info(
      'one training (train.tries): the period-0 features hold fewer than %d distinct groups '
      '(ratio %.2f), so no training is expected to find them',
      c.segment.num_segments,
      history['groups_start']['ratio'],
    )
    return history
  done = [(0, c.seed, workdir, history)]
  for t in range(1, c.train.tries):
    seed, where = try_seed(c.seed, t), os.path.join(workdir, TRIES, str(t))
    logging.warning(
      'try %d of %d (train.tries): training again with seed %d in %s',
      t + 1,
      c.train.tries,
      seed,
      where,
    )
    tried = c.copy_and_resolve_references()
    tried.seed = seed
    tried.train.tries = 1  # try 0's start check decided (train.tries is outside the fingerprint)
    if sharding.is_primary():
      os.makedirs(where, exist_ok=True)
    sharding.barrier(f'jule3d-try-{t}')
    done.append(
      (t, seed, where, _train_once(dataclasses.replace(inputs, config=tried), where, overwrite))
    )
    if done[-1][3]['groups']['distinct']:
      break
  return _keep(inputs, workdir, done)


def try_seed(seed: int, t: int) -> int:
  """The seed of try t (t = 0: the config's own)."""
  return seed + 1000 * t


def _keep(inputs, workdir: str, done: list) -> dict:
  """Saves the try with the lowest group ratio as the newest checkpoint of the workdir's own."""
  c = inputs.config
  t, seed, where, history = min(done, key=lambda d: d[3]['groups']['ratio'])
  tries = [
    {'try': i, 'seed': s, 'workdir': os.path.relpath(w, workdir), **h['groups']}
    for i, s, w, h in done
  ]
  kept = {**history, 'groups_start': done[0][3]['groups_start'], 'tries': tries, 'kept': t}
  m = sharding.mesh()
  like = _initial_state(c)[2]
  source = checkpoint.manager(where, read_only=True)
  step = max(source.all_steps())
  state, arrays, meta = checkpoint.restore(
    source, step, like, c.patches.num_patches, sharding.replicated(m)
  )
  own = checkpoint.manager(workdir, keep=c.train.keep_checkpoints)
  meta = {
    **meta,
    'fingerprint': _fingerprint(inputs)[0],
    'history': kept,
  }
  checkpoint.save(own, max(own.all_steps()) + 1, state, arrays, meta)
  if sharding.is_primary():
    files.write_json_atomic(os.path.join(workdir, HISTORY), kept)
  logging.info(
    'kept try %d of %d (seed %d): group ratios %s',
    t + 1,
    len(done),
    seed,
    ', '.join(f'{d["ratio"]:.2f}' for d in tries),
  )
  return kept


def _checks_of_earlier_runs(c, workdir: str, history: dict, net, state, load_data) -> None:
  """The group checks train() reads that a finished run trained before them lacks: added to its
  history and to train_history.json (the report reads it); the training data is loaded only then."""
  start_read = 'tries' not in history and not history.get('groups', {}).get('distinct', False)
  if 'groups' in history and ('groups_start' in history or not start_read):
    return
  patches = load_data().patches
  if 'groups' not in history:
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    history['groups'] = _trained_check(c, model.make_embed_fn(net), variables, patches)
  if 'groups_start' not in history and not history['groups']['distinct']:
    history['groups_start'] = _start_check(c, patches)
  if sharding.is_primary():
    files.write_json_atomic(os.path.join(workdir, HISTORY), history)


def _initial_state(c):
  """The config's network, optimiser and fresh TrainState (what checkpoints restore against)."""
  net = model.build_model(c.model)
  tx = objective.make_optimizer(c.train)
  state = objective.create_train_state(net, tx, jax.random.PRNGKey(c.seed), c.patches.patch_size)
  return net, tx, state


def _fingerprint(inputs) -> tuple[str, str]:
  """The run's checkpoint fingerprint (its phase-1 config and data) and the data's identity."""
  data_id = volume.identity(inputs.input_volume)
  return checkpoint.fingerprint(inputs.config.to_dict(), data_id), data_id


def _train_once(inputs, workdir: str, overwrite: bool) -> dict:
  """One training (the JULE schedule) in `workdir`, resumed where a checkpoint is; its history."""
  run = _start(inputs, workdir, overwrite)
  if isinstance(run, dict):  # training was already complete
    return run
  while True:
    run.t0 = time.time()
    if run.partial is None:
      _cluster(run)
    _train_epochs(run)
    if _end_period(run):
      return run.history


def _start(inputs, workdir: str, overwrite: bool):
  """A new run, or the resumed one from the newest intact checkpoint; its history when done."""
  c = inputs.config
  fp, data_id = _fingerprint(inputs)
  net, tx, state = _initial_state(c)
  n_s = c.patches.num_patches
  m = sharding.mesh()
  mgr, resume = _open_run(inputs, workdir, fp, overwrite, state, m)
  if resume is not None:
    step, (state, saved, meta) = resume
    if meta.get('done'):
      logging.info('training already complete in %s (checkpoint %d)', workdir, step)
      history = meta['history']
      if c.train.tries > 1:
        load = functools.partial(samples.load_training_data, inputs, centres=saved['centres'], m=m)
        _checks_of_earlier_runs(c, workdir, history, net, state, load)
      return history
  initial = None
  if resume is None:
    t0 = time.time()
    data = samples.load_training_data(inputs, m=m)
    logging.info(
      'sampled %d patches of %d^3 in %.1fs (mean %.4g, std %.4g)',
      n_s,
      c.patches.patch_size,
      time.time() - t0,
      data.mean,
      data.std,
    )
    labels, period, partial = None, 0, None
    history = {'periods': [], 'nmi_patches_raw': None}
    if data.truth is not None:
      initial = features.initial_features(c, data.patches)  # period 0 clusters them too (below)
      with _clustering(period=0):
        raw_labels = merge.agglomerate(initial, c.cluster.num_clusters, **_cluster_kwargs(c))
      history['nmi_patches_raw'] = patch_nmi(data.truth, raw_labels)
      logging.info('no-learning reference: NMI %.4f', history['nmi_patches_raw'] or float('nan'))
  else:
    data = samples.load_training_data(inputs, centres=saved['centres'], m=m)
    labels, period = saved['labels'], int(meta['period'])
    partial, history = meta.get('partial'), meta['history']
    if c.train.tries > 1 and 'groups_start' not in history:  # started before the check existed
      history['groups_start'] = _start_check(c, data.patches)
    logging.info(
      'resuming from checkpoint %d: period %d, epoch %d, %d clusters',
      step,
      period,
      partial['epochs_done'] if partial else 0,
      labels.max() + 1,
    )
  # Data parallel over all devices: parameters replicated, each batch split, the resident patches
  # replicated (one process) or split by rows over the processes (jule3d/sharding.py). A no-op on
  # one device.
  return _Run(
    c=c,
    workdir=workdir,
    fp=fp,
    data_id=data_id,
    mgr=mgr,
    m=m,
    embed_fn=model.make_embed_fn(net),
    epoch_step=make_epoch_step(net, tx, c.train, m),
    data=data,
    state=jax.device_put(state, sharding.replicated(m)),
    labels=labels,
    period=period,
    partial=partial,
    history=history,
    initial=initial,
  )


def _save(run: _Run, done: bool) -> None:
  """One checkpoint per epoch (named by the global SGD step), so a crash costs at most one epoch."""
  c = run.c
  meta = {
    'period': run.period,
    'partial': run.partial,
    'done': done,
    'num_clusters': int(run.labels.max()) + 1,
    'mean': run.data.mean,
    'std': run.data.std,
    'seed': c.seed,
    'fingerprint': run.fp,
    'data_identity': run.data_id,
    'config': json.loads(c.to_json_best_effort()),
    'history': run.history,
  }
  arrays = {'labels': run.labels.astype(np.int32), 'centres': run.data.centres}
  checkpoint.save(run.mgr, int(run.state.step), run.state, arrays, meta)


def _cluster(run: _Run) -> None:
  """The period's merges (none in the extra period on the final labels): new labels, new partial."""
  c = run.c
  start = None if run.labels is None else int(run.labels.max()) + 1
  if start is not None and start <= c.cluster.num_clusters:
    merges = 0  # the extra period on the final labels
  else:
    if run.period == 0:
      feats = (
        run.initial if run.initial is not None else features.initial_features(c, run.data.patches)
      )
      run.initial = None
      if c.train.tries > 1:  # whether another training could find groups (train.train)
        run.history['groups_start'] = _start_check(c, run.data.patches, feats)
    else:
      feats = features.extract_features(
        run.embed_fn,
        {'params': run.state.params, 'batch_stats': run.state.batch_stats},
        run.data.patches,
        c.model.feature_batch_size,
      )
    with _clustering(run.period):
      new, start = merge.cluster_period(
        feats,
        run.labels,
        num_target=c.cluster.num_clusters,
        unfolding_rate=c.cluster.unfolding_rate,
        with_start=True,
        **_cluster_kwargs(c),
      )
    merges = start - (int(new.max()) + 1)
    run.labels = new
  run.partial = {
    'start': start,
    'merges': merges,
    'epochs_done': 0,
    'loss_sum': 0.0,
    'loss_count': 0,
    'seconds': 0.0,
  }


def _train_epochs(run: _Run) -> None:
  """The period's remaining epochs on its labels, a checkpoint after each but the last."""
  c, partial = run.c, run.partial
  epochs, num_clusters = c.train.epochs_per_period, int(run.labels.max()) + 1
  labels_dev = jax.device_put(jnp.asarray(run.labels, jnp.int32), sharding.replicated(run.m))
  shown = progress.Progress(
    f'period {run.period} ({num_clusters} clusters) training',
    epochs,
    'epochs',
    every=0.0,
    done=partial['epochs_done'],
  )
  for epoch in range(partial['epochs_done'], epochs):
    te = time.time()
    idx, valid = epoch_batches(c.patches.num_patches, c.train.batch_size, c.seed, run.period, epoch)
    epoch_losses = []
    for b in range(idx.shape[0]):
      run.state, metrics = run.epoch_step(run.state, run.data.patches, labels_dev, idx[b], valid[b])
      epoch_losses.append(metrics['loss'])
    epoch_losses = np.asarray(jnp.stack(epoch_losses))
    _check_finite(epoch_losses, run.period, int(run.state.step) - len(epoch_losses))
    partial['epochs_done'] = epoch + 1
    partial['loss_sum'] += float(epoch_losses.astype(np.float64).sum())
    partial['loss_count'] += len(epoch_losses)
    seconds = time.time() - te
    done = f'loss {epoch_losses.mean():.4f}, lr {float(metrics["lr"]):.5f}, {seconds:.1f}s'
    if shown.on:  # one line: the epoch's figures with the rate and the period's time left
      rate = len(epoch_losses) * c.train.batch_size / max(seconds, 1e-9)
      shown.update(epoch + 1, f'{done}, {rate:.0f} patches/s')
    else:
      logging.info(
        'period %d epoch %d/%d: %d clusters, %s', run.period, epoch + 1, epochs, num_clusters, done
      )
    if epoch + 1 < epochs:
      partial['seconds'] += time.time() - run.t0
      run.t0 = time.time()
      _save(run, done=False)


def _end_period(run: _Run) -> bool:
  """Records the period, checkpoints it and writes the history; True when training is done."""
  c, partial = run.c, run.partial
  num_clusters = int(run.labels.max()) + 1
  entry = {
    'period': run.period,
    'clusters_start': partial['start'],
    'clusters_end': num_clusters,
    'merges': partial['merges'],
    'epochs': c.train.epochs_per_period,
    'loss_mean': partial['loss_sum'] / max(partial['loss_count'], 1),
    'seconds': round(partial['seconds'] + time.time() - run.t0, 3),
    'nmi_patches': patch_nmi(run.data.truth, run.labels),
  }
  run.history['periods'].append(entry)
  done = num_clusters <= c.cluster.num_clusters and (
    entry['merges'] == 0 or not c.train.final_period
  )
  if done:  # whether the trained features hold K groups (train.tries acts on it)
    variables = {'params': run.state.params, 'batch_stats': run.state.batch_stats}
    run.history['groups'] = _trained_check(c, run.embed_fn, variables, run.data.patches)
  run.period += 1
  run.partial = None
  _save(run, done)
  if sharding.is_primary():
    files.write_json_atomic(os.path.join(run.workdir, HISTORY), run.history)
  logging.info(
    'period %d done: %d -> %d clusters (%d merges), loss %.4f, NMI %s, %.1fs',
    entry['period'],
    entry['clusters_start'],
    num_clusters,
    entry['merges'],
    entry['loss_mean'],
    entry['nmi_patches'],
    entry['seconds'],
  )
  return done


def _trained_check(c, embed_fn, variables, patches) -> dict:
  """_group_check of the trained features of the training patches."""
  feats = features.extract_features(embed_fn, variables, patches, c.model.feature_batch_size)
  return _group_check(c, feats, 'the trained features', advice=True)


def _start_check(c, patches, feats: np.ndarray | None = None) -> dict:
  """_group_check of the period-0 features of the training patches (computed unless given)."""
  if feats is None:
    feats = features.initial_features(c, patches)
  return _group_check(c, feats, 'the period-0 features', advice=False)


def _group_check(c, feats: np.ndarray, what: str, advice: bool) -> dict:
  """groups.structure of `what` (features of the training patches), with K segments; logged (with
  `advice`: what segments cut from them do). Every process takes process 0's verdict."""
  fit = (c.seed, c.segment.kmeans_restarts, c.segment.kmeans_max_fit)
  found = groups.structure(
    feats, groups.kmeans_labels(feats, c.segment.num_segments, *fit)[1], *fit
  )
  found['distinct'] = sharding.primary_says(found['distinct'])
  groups.log_structure(found, f'{what} of the training patches', advice)
  return found
