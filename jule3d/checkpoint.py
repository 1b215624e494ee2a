"""Phase-1 checkpoints: an orbax CheckpointManager under WORKDIR/checkpoints.

One checkpoint per completed JULE period; the step number is the count of completed periods. Items:
  state  the TrainState pytree (params, batch_stats, opt_state, step, rng), restored against an
         abstract target so optax states keep their types;
  data   {'labels': cluster label per training patch, 'centres': the training patch centres};
  meta   JSON: period count, cluster count, normalisation mean/std, seed, the full config and its
         fingerprint, the training history so far.
Everything needed to resume training and to extract features on another volume is in one place.
"""

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jule3d.errors import UserError

CHECKPOINT_DIR = 'checkpoints'

# Fields that change what a checkpoint means: resuming across a change in any of them would mix two
# different runs. Segmentation/evaluation fields are free to change between runs.
FINGERPRINT_SECTIONS = ('seed', 'data', 'patches', 'model', 'cluster', 'train')
_FINGERPRINT_IGNORED = {('train', 'keep_checkpoints'), ('data', 'labels'), ('data', 'cache_chunk')}


def fingerprint(config_dict: dict[str, Any]) -> str:
  """Hash of the config fields that define phase 1 (see FINGERPRINT_SECTIONS).

  Args:
    config_dict: config.to_dict().

  Returns:
    A short hex digest.
  """
  picked = {}
  for section in FINGERPRINT_SECTIONS:
    value = config_dict.get(section)
    if isinstance(value, dict):
      value = {k: v for k, v in value.items() if (section, k) not in _FINGERPRINT_IGNORED}
    picked[section] = value
  text = json.dumps(picked, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint_dir(path: str) -> str:
  """The checkpoints directory for a workdir, or `path` itself if it already is one.

  Args:
    path: a workdir or a checkpoints directory.

  Returns:
    The checkpoints directory path.
  """
  sub = os.path.join(path, CHECKPOINT_DIR)
  if os.path.isdir(sub) or os.path.basename(os.path.normpath(path)) != CHECKPOINT_DIR:
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


def save(
  mgr: ocp.CheckpointManager, step: int, state: Any, data: dict[str, np.ndarray], meta: dict
) -> None:
  """Saves one checkpoint and waits until it is on disk (orbax writes to a temp dir, then renames).

  Args:
    mgr: the manager.
    step: completed-period count.
    state: the TrainState pytree.
    data: {'labels', 'centres'} numpy arrays.
    meta: JSON-serialisable metadata.
  """
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


def latest_meta(mgr: ocp.CheckpointManager) -> tuple[int, dict] | None:
  """The latest step and its metadata, without restoring arrays.

  Args:
    mgr: the manager.

  Returns:
    (step, meta) or None when there is no checkpoint.
  """
  step = mgr.latest_step()
  if step is None:
    return None
  restored = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
  return step, dict(restored['meta'])


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
    (state, data, meta).
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
  return restored['state'], data, dict(restored['meta'])


def open_for_inference(path: str) -> tuple[ocp.CheckpointManager, int, dict]:
  """Opens another run's (or this run's) latest checkpoint for feature extraction.

  Args:
    path: a workdir or its checkpoints directory.

  Returns:
    (manager, step, meta).

  Raises:
    UserError: no checkpoint there.
  """
  directory = checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise UserError(
      f'no checkpoint in {path!r}: run --mode=train first, or set config.segment.checkpoint to '
      'the workdir of a trained run.'
    )
  mgr = manager(directory, read_only=True)
  found = latest_meta(mgr)
  if found is None:
    raise UserError(
      f'no checkpoint in {directory!r}: run --mode=train first, or set config.segment.checkpoint '
      'to the workdir of a trained run.'
    )
  return mgr, found[0], found[1]
