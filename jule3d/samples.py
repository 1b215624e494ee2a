"""The training patches (method §1): sampled, or re-read on resume, normalised, on the devices."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jule3d import patches, sharding


@dataclasses.dataclass
class TrainingData:
  """The n_s training patches on the device, with what is needed to reproduce them."""

  centres: np.ndarray  # [n_s, 3] int32
  patches: jax.Array  # [n_s, w, w, w] float32, normalised
  mean: float
  std: float
  truth: np.ndarray | None  # reference label at each centre (0 = not annotated), if configured


def load_training_data(inputs, centres: np.ndarray | None = None, m=None) -> TrainingData:
  """Samples (or re-reads) the training patches and normalises them with their own statistics.

  With several processes the patches become one global array split by rows: each process reads
  only the rows of its own devices, and the statistics are summed over the processes.

  Args:
    inputs: pipeline.Inputs.
    centres: saved centres to re-read; None samples them from the config seed.
    m: the device mesh (default: every device).

  Returns:
    TrainingData (patches on the devices: replicated, or split by rows over the processes).
  """
  c = inputs.config
  w = c.patches.patch_size
  if centres is None:
    centres = patches.sample_centres(
      inputs.image,
      c.patches.num_patches,
      w,
      c.data.threshold,
      c.data.foreground,
      c.seed,
      interior=inputs.interior,
    )
  m = m or sharding.mesh()
  shape = (len(centres), w, w, w)
  rows = sharding.row_sharding(m, len(centres))
  if rows.is_fully_replicated:
    raw = patches.read_patches(inputs.patch_source, centres, w)
    mean, std = patches.patch_stats(raw)
    normalised = jax.device_put(normalised_on_device(raw, mean, std), rows)
  else:
    mine = sharding.local_rows(shape, rows)
    logging.info(
      'process %d reads its %d of the %d training patches',
      jax.process_index(),
      len(mine),
      len(centres),
    )
    raw = patches.read_patches(inputs.patch_source, centres[mine], w)
    mean, std = patches.stats_from_sums(sharding.sum_over_processes(patches.patch_sums(raw)))
    local = patches.normalise(raw, mean, std)  # host rows: put_rows places them
    normalised = sharding.put_rows(shape, rows, lambda r: local[np.searchsorted(mine, r)])
  del raw
  truth = None
  if inputs.labels is not None:
    # The reference lives on the input's grid (jule3d/working.py when the CNN sees a working copy).
    at = centres if inputs.grid is None else inputs.grid.input_voxels(centres)
    truth = np.asarray(
      inputs.labels.store.vindex[at[:, 0], at[:, 1], at[:, 2]].read().result()
    ).astype(np.int64)
  return TrainingData(centres=centres, patches=normalised, mean=mean, std=std, truth=truth)


def normalised_on_device(raw: np.ndarray, mean: float, std: float, chunk: int = 1024) -> jax.Array:
  """patches.normalise(raw) on the default device, converted in chunks (bounded host memory).

  Args:
    raw: [N, ...] patches in the volume's dtype.
    mean: normalisation mean.
    std: normalisation std.
    chunk: patches converted at once.

  Returns:
    Device array [N, ...] float32.
  """
  parts = [
    jnp.asarray(patches.normalise(raw[i : i + chunk], mean, std)) for i in range(0, len(raw), chunk)
  ]
  return jnp.concatenate(parts) if parts else jnp.zeros((0,) + raw.shape[1:], jnp.float32)
