"""What launch.py calls: resolve the inputs once, then train -> segment -> evaluate.

What goes where in the workdir: jule3d/workdir.py.
"""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from typing import Any

import ml_collections
from absl import logging

from jule3d import checks, files, foreground, grid, lock, patches, sharding, volume, working
from jule3d.errors import UserError
from jule3d.workdir import CACHE, MNI152, PHANTOM, REPORT_MD, TIMINGS

MODES = ('all', 'train', 'segment', 'evaluate')
# Free space a run needs besides its converted input and label volumes: checkpoints (the paper CNN
# with optimiser state, times the kept few), training record, report and figures.
MIN_FREE_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class Inputs:
  """The resolved run: the config with the data paths filled in, the opened volumes.

  `content` is what patches are cut from: the image itself, or its specimen-masked copy when
  config.patches.mask_outside (jule3d/specimen.py); foreground, grid and baselines use `image`.
  """

  config: ml_collections.ConfigDict
  image: volume.Volume
  labels: volume.Volume | None
  content: volume.Volume | None = None
  interior: Any = None  # specimen.Interior when config.patches.domain == 'specimen'
  # When the input's own grid does not suit 3D patches (jule3d/working.py): `image` is the working
  # copy (resampled, padded), `original` the input as opened, `grid` the map between the two.
  original: volume.Volume | None = None
  grid: Any = None  # working.Grid

  @property
  def input_volume(self) -> volume.Volume:
    """The volume as the user gave it: outputs take its shape and geometry, scores its grid."""
    return self.original if self.original is not None else self.image

  @property
  def patch_source(self) -> volume.Volume:
    """The volume patches are read from (`content`, else `image`)."""
    return self.content if self.content is not None else self.image


def resolve_inputs(
  config: ml_collections.ConfigDict,
  workdir: str,
  for_training: bool = False,
  for_segmenting: bool = False,
  created: bool | None = None,
  validated: bool = False,
) -> Inputs:
  """Validates the config, generates the phantom if asked, opens and checks the volumes.

  Args:
    config: the run config.
    workdir: the run's directory (created if needed).
    for_training: also check that enough foreground centres exist for config.patches.num_patches.
    for_segmenting: also check that the stride grid holds at least config.segment.num_segments
      foreground patches (so that `--mode=all` does not find out only after training).
    created: whether the caller created `workdir` for this run (then bad input removes it again);
      default: whether it does not exist yet.
    validated: the caller has already run checks.validate_config on `config` (pipeline.run).

  Returns:
    Inputs with config.data.path (and labels) resolved, and config.data.threshold a number ('otsu'
    derived from the image: jule3d/foreground.py).

  Raises:
    UserError: any bad field or input, before expensive work.
  """
  if not validated:
    checks.validate_config(config)
  config = ml_collections.ConfigDict(config.to_dict())  # a private, unlocked copy
  existed = os.path.isdir(workdir) if created is None else not created
  _make_workdir(workdir)
  before = _entries(workdir)
  try:
    _check_free_space(workdir, MIN_FREE_BYTES + _conversion_bytes(config.data.path))
    inputs = _open_inputs(config, workdir)
    # The label volumes (zarr + NIfTI, compressed) take at most about one byte per voxel.
    _check_free_space(workdir, MIN_FREE_BYTES + math.prod(inputs.image.shape))
    with volume.read_errors(inputs.image):
      if for_training:
        _check_enough_centres(inputs)
      if for_segmenting:
        _check_enough_grid_patches(inputs)
    if inputs.labels is not None:
      from jule3d import scores

      scores.check_reference(inputs.labels)
    return inputs
  except UserError:
    # Bad input leaves no trace: a workdir this call created is removed again, and in an existing
    # one what this call added (a phantom, converted copies under cache/) is removed.
    if not existed:
      shutil.rmtree(workdir, ignore_errors=True)
    else:
      for entry in sorted(_entries(workdir) - before, reverse=True):
        files.remove_path(os.path.join(workdir, entry))
    raise


def _conversion_bytes(path: str) -> int:
  # A single-file input (NIfTI, TIFF, npy) is converted into a compressed zarr under cache/: about
  # its own size. Chunked stores and folders are read in place or counted by the later check.
  return os.path.getsize(path) if path and os.path.isfile(path) else 0


def _check_free_space(workdir: str, need: int) -> None:
  free = shutil.disk_usage(workdir).free
  if free < need:
    raise UserError(
      f'--workdir {workdir!r} has {free / 2**20:,.0f} MiB free, this run needs at least '
      f'{need / 2**20:,.0f} MiB (converted input, checkpoints, label volumes): free space there or '
      'choose another --workdir.'
    )


def _entries(workdir: str) -> set[str]:
  # What resolve_inputs may add, and nothing else (a run elsewhere in the workdir is not touched).
  names = {n for n in (PHANTOM, MNI152, CACHE) if os.path.lexists(os.path.join(workdir, n))}
  cache = os.path.join(workdir, CACHE)
  if os.path.isdir(cache):
    names |= {os.path.join(CACHE, n) for n in os.listdir(cache)}
  return names


def _open_inputs(config: ml_collections.ConfigDict, workdir: str) -> Inputs:
  _resolve_source(config, workdir)
  cache = os.path.join(workdir, CACHE)
  d = config.data
  # The file's geometry is the truth: data.spacing only fills in a missing one (or replaces it with
  # data.spacing_override); the labels, of the same scan, are opened under the same rules.
  geometry = {
    'spacing': tuple(d.spacing),
    'spacing_override': d.spacing_override,
    'expected_spacing': tuple(d.expected_spacing),
  }
  image = volume.open_volume(
    d.path, cache_dir=cache, chunk=d.cache_chunk, name='data.path', **geometry
  )
  with volume.read_errors(image):
    volume.validate_volume(image)  # any size: thinner than a patch is padded (working.plan)
    foreground.resolve_threshold(config, image)  # 'otsu' -> a number; logs the foreground share
  if d.expected_shape and tuple(d.expected_shape) != image.shape:
    logging.warning(
      "volume shape %s differs from this config's paper volume %s: fine for your own data, "
      'but check the threshold (%s) suits it.',
      image.shape,
      tuple(d.expected_shape),
      d.threshold,
    )
  labels = _open_labels(d, image, cache, geometry)
  logging.info(
    'volume %s: shape %s, %s, spacing %s (from: %s)',
    d.path,
    image.shape,
    image.dtype,
    image.spacing,
    image.geometry,
  )
  original = None
  to_working = working.plan(
    image.shape, image.spacing, config.patches.patch_size, d.max_anisotropy, d.resample_spacing
  )
  if to_working is not None:  # the method runs on a working copy, outputs come back on this grid
    logging.info('working grid: %s', working.describe(to_working, image.spacing))
    with volume.read_errors(image):
      original, image = image, working.working_volume(image, to_working, cache, d.cache_chunk)
  content, interior = _specimen_parts(config, image, cache)
  return Inputs(
    config=config,
    image=image,
    labels=labels,
    content=content,
    interior=interior,
    original=original,
    grid=to_working,
  )


def _resolve_source(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Fills in data.path (and data.labels) for a built-in input.

  The rule: data.path, when set, is the input. Without it, data.builtin='mni152' is the MNI152
  template (labels: its tissue maps); without either, data.phantom_shape is the built-in phantom of
  that shape and data.phantom_seed (labels: its ground truth). A data.labels given by the user is
  kept in both cases.
  """
  if not config.data.path and config.data.builtin == 'mni152':
    from jule3d import datasets

    paths = datasets.prepare_mni152(os.path.join(workdir, MNI152))
    config.data.path = paths['image']
    config.data.labels = config.data.labels or paths['labels']
  elif not config.data.path:
    from jule3d import phantom

    paths = phantom.write_phantom(
      os.path.join(workdir, PHANTOM),
      tuple(config.data.phantom_shape),
      config.data.phantom_seed,
      **({'spacing': tuple(config.data.spacing)} if config.data.spacing else {}),
    )
    config.data.path = paths['image']
    config.data.labels = config.data.labels or paths['labels']


def _open_labels(d, image, cache: str, geometry: dict):
  """data.labels opened under the image's geometry rules and checked to lie on its grid."""
  labels = None
  if d.labels:
    labels = volume.open_volume(
      d.labels, cache_dir=cache, chunk=d.cache_chunk, name='data.labels', **geometry
    )
    if labels.shape != image.shape:
      raise UserError(
        f'config.data.labels {d.labels!r} has shape {labels.shape}, but the image has shape '
        f'{image.shape}: the label volume must match the image voxel for voxel.'
      )
    volume.check_same_grid(image, labels, name='data.labels')
  return labels


def _specimen_parts(config: ml_collections.ConfigDict, image, cache: str):
  """(masked copy or None, interior or None) as patches.mask_outside and patches.domain ask."""
  d = config.data
  content = interior = None
  if config.patches.mask_outside or config.patches.domain == 'specimen':
    from jule3d import specimen

    block = config.patches.outside_block
    with volume.read_errors(image):
      if config.patches.domain == 'specimen':
        envelope = config.segment.fill and config.segment.fill_envelope
        interior = specimen.interior(image, d.threshold, d.foreground, block, envelope, cache)
      if config.patches.mask_outside:  # one pass over the volume for both (known=interior)
        content = specimen.masked_volume(
          image,
          d.threshold,
          d.foreground,
          block,
          cache,
          d.cache_chunk,
          known=interior,
          fill_mode=config.patches.outside_fill,
          reach=config.patches.patch_size,
        )
  return content, interior


def _check_enough_centres(inputs: Inputs) -> None:
  c = inputs.config
  counts = patches.count_foreground_centres(
    inputs.image,
    c.patches.patch_size,
    c.data.threshold,
    c.data.foreground,
    interior=inputs.interior,
  )
  patches.require_centres(
    int(counts.sum()), c.patches.num_patches, c.data.threshold, c.data.foreground
  )


def _check_enough_grid_patches(inputs: Inputs) -> None:
  c = inputs.config
  w, s, k = c.patches.patch_size, c.segment.stride, c.segment.num_segments
  centres = grid.centres(
    inputs.image, w, s, c.data.threshold, c.data.foreground, interior=inputs.interior
  )
  grid.require(len(centres), k, s)


def _make_workdir(workdir: str) -> None:
  if os.path.lexists(workdir) and not os.path.isdir(workdir):
    raise UserError(
      f'--workdir {workdir!r} exists and is not a folder: choose a directory (new or existing) '
      'for the outputs.'
    )
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(
      f'--workdir {workdir!r} cannot be created ({e.strerror}): choose a directory you can write to.'
    ) from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise UserError(f'--workdir {workdir!r} is not writable: choose a directory you can write to.')


def run(
  config: ml_collections.ConfigDict, workdir: str, mode: str = 'all', overwrite: bool = False
):
  """Runs one mode of the pipeline.

  Args:
    config: the run config.
    workdir: the run's directory.
    mode: 'all' (train -> segment -> evaluate: the report, scored when labels are configured;
      with config.segment.checkpoint, segment -> evaluate with that run's model), 'train',
      'segment' or 'evaluate'.
    overwrite: replace existing outputs instead of refusing.
  """
  if mode not in MODES:
    raise UserError(f'--mode={mode!r}: expected one of {", ".join(MODES)}.')
  checks.validate_config(config)
  sharding.initialize(config.distributed)
  with contextlib.ExitStack() as held:
    if sharding.is_primary():  # one run per workdir: the primary holds the lock for the whole run
      created = not os.path.isdir(workdir)
      _make_workdir(workdir)
      held.enter_context(lock.exclusive(workdir))
    else:
      created = None
    return _run(config, workdir, mode, overwrite, created)


def _run(config, workdir: str, mode: str, overwrite: bool, created: bool | None):
  primary = sharding.is_primary()
  # With another run's model named (segment.checkpoint), 'all' segments with it and reports: a model
  # trained here would never be used.
  trains = mode == 'train' or (mode == 'all' and not config.segment.checkpoint)
  if mode == 'all' and not trains:
    logging.info(
      'config.segment.checkpoint = %r: segmenting with that model, nothing is trained here',
      config.segment.checkpoint,
    )

  def resolve():
    return resolve_inputs(
      config,
      workdir,
      for_training=trains,
      for_segmenting=mode in ('all', 'segment'),
      created=created,
      validated=True,  # run() did, before starting the processes
    )

  # Several processes share the workdir: the primary generates or converts the inputs and clears
  # stale temporaries, then the others open what it wrote.
  if primary:
    inputs = resolve()
    stale = files.remove_stale_temporaries(workdir)
    if stale:
      logging.info('removed %d temporaries left by an interrupted run', len(stale))
  sharding.barrier('jule3d-inputs')
  if not primary:
    inputs = resolve()
  if trains:
    from jule3d import train

    with _timed(workdir, 'train'):
      train.train(inputs, workdir, overwrite=overwrite)
  if mode in ('all', 'segment'):
    from jule3d import segment

    with _timed(workdir, 'segment'):
      segment.segment(inputs, workdir, overwrite=overwrite or mode == 'all')
  sharding.barrier('jule3d-segmented')
  if not primary:
    return None  # evaluation reads the finished label volume: one process does it
  if mode in ('all', 'evaluate'):  # the report is written with or without reference labels
    from jule3d import evaluate

    report = evaluate.evaluate(inputs, workdir, overwrite=overwrite)
    logging.info('report: %s', os.path.join(workdir, REPORT_MD))
    return report
  return None


@contextlib.contextmanager
def _timed(workdir: str, key: str):
  t0 = time.time()
  yield
  if not sharding.is_primary():
    return
  path = os.path.join(workdir, TIMINGS)
  timings = {}
  if os.path.exists(path):
    with open(path) as f:
      timings = json.load(f)
  timings[key] = round(time.time() - t0, 3)
  files.write_json_atomic(path, timings)
