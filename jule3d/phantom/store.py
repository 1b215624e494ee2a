"""The phantom written once into a folder (image, labels, meta) and reused for the same arguments."""

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from jule3d import files
from jule3d.errors import UserError
from jule3d.phantom.annotate import annotate_slices, annotation_positions
from jule3d.phantom.generate import (
  LABEL_NAMES,
  THRESHOLD,
  _check_seed,
  _check_shape,
  _params,
  make_phantom,
)

# Part of the cache record: bump it whenever the generator's output changes for the same arguments.
VERSION = 1


_META = 'phantom.json'


def write_phantom(
  outdir: str,
  shape: Sequence[int],
  seed: int,
  spacing: Sequence[float] = (0.03, 0.03, 0.03),
  **knobs: float,
) -> dict[str, str]:
  """Writes image.zarr, labels.zarr and labels_annotated.zarr (7 axial slices) under outdir.

  Skips the generation when outdir already holds the three stores from the same arguments (they
  are recorded in outdir/phantom.json, written last, so an interrupted run is redone).

  Args:
    outdir: output folder (created if needed).
    shape: (z, y, x) voxels.
    seed: phantom seed.
    spacing: voxel edge per axis (mm) stored with the volumes.
    **knobs: overrides of PhantomParams fields.

  Returns:
    Paths by name: 'image', 'labels', 'labels_annotated', 'meta'.

  Raises:
    UserError: bad arguments or an unwritable outdir.
  """
  shape = _check_shape(shape, 'write_phantom shape')
  seed = _check_seed(seed, 'write_phantom seed')
  try:
    spacing = tuple(float(s) for s in spacing)
  except (TypeError, ValueError):
    spacing = ()
  if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
    raise UserError(f'write_phantom spacing={spacing}: expected 3 positive numbers.')
  params = _params(knobs)
  paths = {
    name: os.path.join(outdir, f'{name}.zarr') for name in ('image', 'labels', 'labels_annotated')
  }
  paths['meta'] = os.path.join(outdir, _META)
  record = {
    'version': VERSION,
    'shape': list(shape),
    'seed': seed,
    'spacing': list(spacing),
    'params': dataclasses.asdict(params),
    'threshold': THRESHOLD,
    'labels': {str(k): v for k, v in LABEL_NAMES.items()},
    'annotated_slices_axis0': annotation_positions(shape[0]).tolist(),
  }
  record['params']['region_mean_ratio'] = list(params.region_mean_ratio)
  if _up_to_date(paths, record):
    return paths

  from jule3d import volume  # lazily: the writer pulls in tensorstore

  try:
    os.makedirs(outdir, exist_ok=True)
    if os.path.exists(paths['meta']):
      os.remove(paths['meta'])  # the stores below are about to change: no stale record
  except OSError as e:
    raise UserError(f'phantom output folder {outdir!r}: {e.strerror}.') from None
  image, labels = make_phantom(shape, seed, **knobs)
  volume.save_zarr(paths['image'], image, spacing=spacing)
  volume.save_zarr(paths['labels'], labels, spacing=spacing)
  volume.save_zarr(paths['labels_annotated'], annotate_slices(labels), spacing=spacing)
  files.write_json_atomic(paths['meta'], record)
  return paths


def _up_to_date(paths, record):
  try:
    with open(paths['meta']) as f:
      if json.load(f) != record:
        return False
  except (OSError, ValueError):
    return False
  return all(os.path.isdir(paths[k]) for k in ('image', 'labels', 'labels_annotated'))
