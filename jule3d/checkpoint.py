"""Phase-1 checkpoints: an orbax CheckpointManager under WORKDIR/checkpoints.

One checkpoint per epoch, named by the global SGD step; the last `keep` are kept. Items:
  state  the TrainState pytree (params, batch_stats, opt_state, step, rng), restored against an
         abstract target so optax states keep their types;
  data   {'labels': cluster label per training patch, 'centres': the training patch centres};
  meta   JSON: period count, cluster count, normalisation mean/std, seed, the full config and its
         fingerprint, the training history so far, and a digest of the arrays (`arrays_sha256`).
Everything needed to resume training and to extract features on another volume is in one place.

A checkpoint that cannot be restored (missing, truncated or garbled files, a wrong digest) is
skipped for the newest intact one (`newest_intact`); in the run's own folder it is moved to
damaged_checkpoints/ beside checkpoints/, never deleted.
"""

import hashlib
import json
import logging as std_logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from jule3d import interrupt
from jule3d.errors import UserError
from jule3d.workdir import CHECKPOINTS, DAMAGED_CHECKPOINTS

T = TypeVar('T')


# Fields that change what a checkpoint means: resuming across a change in any of them would mix two
# different runs. Segmentation/evaluation fields are free to change between runs.
FINGERPRINT_SECTIONS = ('seed', 'data', 'patches', 'model', 'cluster', 'train')
# Fields that change neither the trained model nor its features: a run resumes across them.
_FINGERPRINT_IGNORED = {
  ('train', 'keep_checkpoints'),
  ('train', 'tries'),  # each try is a training of its own (jule3d/train.py)
  ('data', 'labels'),
  ('data', 'cache_chunk'),
  ('model', 'feature_batch_size'),
}
# Fields added after runs were trained without them, and the value that means "as before": at that
# value a field is left out of the hash, so a run trained before it existed still resumes.
_FINGERPRINT_ADDED = {('train', 'augment'): 'none'}


def fingerprint(config_dict: dict[str, Any], data: str | None = None) -> str:
  """Hash of the config fields that define phase 1 (see FINGERPRINT_SECTIONS), and of the data.

  The data is named by what it is, not where it lies: with `data` (volume.identity of the input),
  config.data.path is left out, so a copied or moved workdir, or a moved scan, keeps its
  fingerprint, and a different scan under the same path does not.

  Args:
    config_dict: config.to_dict().
    data: volume.identity of the input volume; None hashes config.data.path as given.

  Returns:
    A short hex digest.
  """
  picked = {}
  for section in FINGERPRINT_SECTIONS:
    value = config_dict.get(section)
    if isinstance(value, dict):
      value = {
        k: v
        for k, v in value.items()
        if (section, k) not in _FINGERPRINT_IGNORED
        and not ((section, k) in _FINGERPRINT_ADDED and v == _FINGERPRINT_ADDED[section, k])
      }
    picked[section] = value
  if data is not None:
    picked['data'] = {**picked['data'], 'path': None, 'identity': data}
  text = json.dumps(picked, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint_dir(path: str) -> str:
  """The checkpoints directory for a workdir, or `path` itself if it already is one.

  Args:
    path: a workdir or a checkpoints directory.

  Returns:
    The checkpoints directory path.
  """
  sub = os.path.join(path, CHECKPOINTS)
  if os.path.isdir(sub) or os.path.basename(os.path.normpath(path)) != CHECKPOINTS:
    return sub
  return path


def manager(path: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the last `keep` checkpoints.

  Args:
    path: workdir (checkpoints go to path/checkpoints) or a checkpoints directory.
    keep: checkpoints kept; older ones are pruned.
    read_only: open an existing directory for restoring only.

  Returns:
    The manager.
  """
  directory = os.path.abspath(checkpoint_dir(path))
  # cleanup_tmp_directories: a run killed mid-save leaves orbax's temporary step folder behind.
  options = ocp.CheckpointManagerOptions(
    create=not read_only,
    max_to_keep=keep,
    read_only=read_only,
    cleanup_tmp_directories=not read_only,
  )
  return ocp.CheckpointManager(directory, options=options, item_names=('state', 'data', 'meta'))


def arrays_digest(state: Any, data: dict[str, np.ndarray]) -> str:
  """A digest of every array of a checkpoint (saved in its meta, checked on restore).

  Orbax's own files do not catch every damage: a garbled byte in an uncompressed chunk reads back
  as a wrong number without an error. Replicated arrays are read from this process's first shard.

  Args:
    state: the TrainState pytree.
    data: {'labels', 'centres'} numpy arrays.

  Returns:
    A hex digest.
  """
  h = hashlib.sha256()
  for leaf in jax.tree.leaves((state, data)):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = leaf.addressable_data(0)
    a = np.asarray(leaf)
    h.update(f'{a.shape}{a.dtype.str}'.encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def save(
  mgr: ocp.CheckpointManager, step: int, state: Any, data: dict[str, np.ndarray], meta: dict
) -> None:
  """Saves one checkpoint and waits until it is on disk (orbax writes to a temp dir, then renames).

  A stop signal during the save is held until the checkpoint is complete (jule3d/interrupt.py).
  The meta gets 'arrays_sha256' (arrays_digest), which `restore` checks.

  Args:
    mgr: the manager.
    step: the global SGD step.
    state: the TrainState pytree.
    data: {'labels', 'centres'} numpy arrays.
    meta: JSON-serialisable metadata.
  """
  meta = {**meta, 'arrays_sha256': arrays_digest(state, data)}
  with interrupt.deferred():
    mgr.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.StandardSave(data),
        meta=ocp.args.JsonSave(meta),
      ),
      force=True,
    )
    mgr.wait_until_finished()


def read_meta(mgr: ocp.CheckpointManager, step: int) -> dict:
  """A checkpoint's metadata, without restoring arrays.

  Args:
    mgr: the manager.
    step: which checkpoint.

  Returns:
    The meta dict.
  """
  restored = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
  meta = restored['meta']
  if not isinstance(meta, dict):
    raise ValueError(f'its metadata is {type(meta).__name__}, not a JSON object')
  return dict(meta)


def restore(
  mgr: ocp.CheckpointManager,
  step: int,
  state_like: Any,
  num_patches: int,
  state_sharding: jax.sharding.Sharding | None = None,
) -> tuple[Any, dict[str, np.ndarray], dict]:
  """Restores a checkpoint against the structure of `state_like` (an initialised TrainState).

  Args:
    mgr: the manager.
    step: which checkpoint.
    state_like: a TrainState with the right structure, shapes and dtypes (values unused).
    num_patches: n_s, for the data item's shapes.
    state_sharding: where to place the restored state (e.g. replicated over every device of every
      process); default: as `state_like`.

  Returns:
    (state, data, meta), meta as saved (without 'arrays_sha256').

  Raises:
    ValueError: the arrays do not match the digest saved with them (a damaged checkpoint);
      orbax's and tensorstore's own errors for unreadable files.
  """
  abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
  if state_sharding is not None:
    abstract_state = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=state_sharding), abstract_state
    )
  abstract_data = {
    'labels': jax.ShapeDtypeStruct((num_patches,), np.int32),
    'centres': jax.ShapeDtypeStruct((num_patches, 3), np.int32),
  }
  restored = mgr.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=ocp.args.StandardRestore(abstract_data),
      meta=ocp.args.JsonRestore(),
    ),
  )
  data = {k: np.asarray(v) for k, v in restored['data'].items()}
  meta = dict(restored['meta'])
  saved = meta.pop('arrays_sha256', None)  # checkpoints before it was added have none
  if saved is not None and arrays_digest(restored['state'], data) != saved:
    raise ValueError('its arrays do not match the digest saved with them')
  return restored['state'], data, meta


class NoIntactCheckpoint(UserError):
  """Checkpoints exist, but none of them can be restored."""


def _reason(e: BaseException) -> str:
  # tensorstore's messages nest "Error opening ...: Error reading ...: <cause> [tensorstore_spec=..]"
  # : the first clause and the cause name the file and what is wrong with it.
  lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
  text = (lines[0] if lines else type(e).__name__).split(' [tensorstore_spec')[0]
  clauses = text.split(': ')
  if len(text) > 160 and len(clauses) > 2:
    text = f'{clauses[0]}: ... {clauses[-2]}: {clauses[-1]}'
  return text


def newest_intact(
  mgr: ocp.CheckpointManager, load: Callable[[int], T], set_aside: bool
) -> tuple[int, T] | None:
  """Restores the newest checkpoint that can be restored, skipping damaged ones.

  A checkpoint that fails to restore (missing, truncated or garbled files, a wrong digest) is
  logged in one line naming its step and why. When an older one restores, the damaged newer ones
  are moved (never deleted) to DAMAGED_CHECKPOINTS beside the checkpoints folder if `set_aside` (this
  run's own folder), or left where they are (another run's folder, opened read-only).

  Args:
    mgr: the manager.
    load: restores one step; a UserError it raises (a config problem, not damage) propagates.
    set_aside: move the damaged checkpoints out of the manager's folder.

  Returns:
    (step, load(step)) for the newest intact checkpoint, or None when there is none at all.

  Raises:
    NoIntactCheckpoint: checkpoints exist but none restores (nothing is moved then).
  """
  directory = str(mgr.directory)
  mgr.reload()
  steps = sorted(mgr.all_steps(), reverse=True)
  _silence_late_read_errors()  # before the first attempt: the late reports can come at any time
  damaged = []  # (step, why), logged once an intact one is found, else named in the error
  for step in steps:
    try:
      value = load(step)
    except UserError:
      raise
    except Exception as e:  # orbax and tensorstore raise plain Exception for unreadable files
      damaged.append((step, _reason(e)))
      continue
    if damaged:
      for bad, why in damaged:
        logging.warning('checkpoint %d in %s cannot be restored: %s', bad, directory, why)
      where = _set_aside(mgr, [bad for bad, _ in damaged]) if set_aside else None
      logging.warning(
        'using checkpoint %d instead; the damaged one%s %s',
        step,
        's' if len(damaged) > 1 else '',
        f'moved to {where}' if where else 'left in place (only read here)',
      )
    return step, value
  if not steps:
    return None
  raise NoIntactCheckpoint(
    f'none of the {len(steps)} checkpoints in {directory!r} can be restored (steps '
    f'{", ".join(map(str, steps))}; the newest: {damaged[0][1]}): rerun with --overwrite to '
    'delete them and train from scratch.'
  )


_silenced = False


def _silence_late_read_errors() -> None:
  # When one array of a checkpoint cannot be read, orbax stops the restore and closes its event
  # loop while the reads of the other arrays are still in flight; they then end in "Event loop is
  # closed" (sys.unraisablehook) and "Task exception was never retrieved" (the asyncio logger): a
  # page of tracebacks about the damage already reported in one line. Only those two reports are
  # dropped (asyncio serves only orbax's and tensorstore's I/O here), from the first restore on:
  # they are logged when the abandoned tasks are collected, which may be before orbax raises.
  global _silenced
  if _silenced:
    return
  _silenced = True
  late = ('Task exception was never retrieved', 'Future exception was never retrieved')
  std_logging.getLogger('asyncio').addFilter(lambda r: not str(r.msg).startswith(late))
  previous = sys.unraisablehook

  def hook(unraisable) -> None:
    if isinstance(unraisable.exc_value, RuntimeError) and 'Event loop is closed' in str(
      unraisable.exc_value
    ):
      return
    previous(unraisable)

  sys.unraisablehook = hook


def _set_aside(mgr: ocp.CheckpointManager, steps: list[int]) -> str:
  directory = os.path.abspath(str(mgr.directory))
  where = os.path.join(os.path.dirname(directory), DAMAGED_CHECKPOINTS)
  os.makedirs(where, exist_ok=True)
  stamp = time.strftime('%Y%m%dT%H%M%S')
  for step in steps:
    source = os.path.join(directory, str(step))
    if os.path.lexists(source):
      os.replace(source, os.path.join(where, f'{step}-{stamp}'))
  mgr.reload()
  return where


def open_for_inference(path: str) -> ocp.CheckpointManager:
  """Opens another run's (or this run's) checkpoints for feature extraction (`newest_intact`).

  Args:
    path: a workdir or its checkpoints directory.

  Returns:
    A read-only manager.

  Raises:
    UserError: no checkpoint there.
  """
  directory = checkpoint_dir(path)
  missing = UserError(
    f'no checkpoint in {path!r}: run --mode=train first, or set config.segment.checkpoint to '
    'the workdir of a trained run.'
  )
  if not os.path.isdir(directory):
    raise missing
  mgr = manager(directory, read_only=True)
  if not mgr.all_steps():
    raise missing
  return mgr
