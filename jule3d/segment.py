"""Phase 2 (method §5): grid patches -> CNN features (restored checkpoint) -> k-means -> s^3 blocks.

The model, its normalisation statistics and its patch size come from the checkpoint, so a model
trained on one volume segments another (`config.segment.checkpoint` = that run's workdir). Patches
stream from the volume slab by slab and the label volume is written slab by slab, so neither the
volume nor the label volume is ever whole in memory; the grid features are M x embed_dim floats,
or M x hidden_dim where k-means reads the hidden layer (segment.layer, `reading_layer`).
"""

import os
import shutil
import time

import jax
import numpy as np
from absl import logging
from scipy import ndimage

from jule3d import (
  checkpoint,
  dense,
  features,
  files,
  grid,
  groups,
  model,
  objective,
  patches,
  regularise,
  sharding,
  volume,
  working,
)
from jule3d.errors import UserError
from jule3d.workdir import (
  FEATURES,
  SEGMENT_PROGRESS,
  SEGMENTATION,
  SEGMENTATION_NIFTI,
  SEGMENTATION_NRRD,
)

# Fields that must agree between the config and the checkpoint's config for features to mean the
# same thing.
_MODEL_FIELDS = ('conv_features', 'kernel_size', 'pool_size', 'hidden_dim', 'embed_dim')
# Fields added later, with the value that checkpoints written before them were trained with.
_ADDED_DEFAULTS = {
  'model': {'head': 'flatten', 'centre_size': 0},
  # What the CNN saw around the specimen (jule3d/specimen.py): patches masked another way are other
  # inputs. The fill and its block only matter where the outside is masked.
  'patches': {'mask_outside': False, 'outside_fill': 'mean', 'outside_block': 4},
}


def checkpoint_mismatches(trained: dict, config) -> list[tuple[str, object, object]]:
  """The fields where a checkpoint's training config and this config disagree on the features.

  Args:
    trained: the checkpoint's config (a dict, as stored in its metadata).
    config: this run's config.

  Returns:
    (field, checkpoint's value, this config's value) for each disagreement, the patch edge first.
  """
  had = {s: {**_ADDED_DEFAULTS[s], **trained[s]} for s in ('model', 'patches')}
  fields = [('model', f) for f in (*_MODEL_FIELDS, *_ADDED_DEFAULTS['model'])]
  fields.insert(0, ('patches', 'patch_size'))
  masked = had['patches']['mask_outside']
  fields += [('patches', f) for f in (_ADDED_DEFAULTS['patches'] if masked else ['mask_outside'])]
  return [
    (f'{s}.{f}', had[s][f], config[s][f])
    for s, f in fields
    if _norm(had[s][f]) != _norm(config[s][f])
  ]


def load_model(config, workdir: str):
  """Restores the trained CNN for feature extraction.

  Args:
    config: the run config (config.segment.checkpoint may name another run).
    workdir: this run's workdir (used when config.segment.checkpoint is empty).

  Returns:
    (net, variables, meta) where meta holds 'mean', 'std' and the training config.

  Raises:
    UserError: no checkpoint, or one trained with different model/patch settings.
  """
  source = config.segment.checkpoint or workdir
  mgr = checkpoint.open_for_inference(source)
  net = model.build_model(config.model)
  tx = objective.make_optimizer(config.train)
  like = objective.create_train_state(net, tx, jax.random.PRNGKey(0), config.patches.patch_size)

  def load(step: int):
    trained = checkpoint.read_meta(mgr, step)['config']
    mismatches = checkpoint_mismatches(trained, config)
    if mismatches:
      field, was, now = mismatches[0]
      raise UserError(
        f'the checkpoint in {source!r} was trained with config.{field} = {was!r}, but this config '
        f'has {now!r}: use the config it was trained with (or --config.{field}={was!r}).'
      )
    return checkpoint.restore(mgr, step, like, int(trained['patches']['num_patches']))

  # Another run's folder is only read; this run's own damaged checkpoints are moved aside.
  own = not config.segment.checkpoint and sharding.is_primary()
  newest = max(mgr.all_steps())
  step, (state, _, meta) = checkpoint.newest_intact(mgr, load, set_aside=own)
  if step != newest and not meta.get('done'):  # the finished model was lost: do not use a half one
    raise UserError(
      f'the newest checkpoint in {source!r} is damaged and the newest intact one (step {step}) is '
      'from an unfinished training: run --mode=train (or --mode=all) there to finish it again.'
    )
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  logging.info('restored checkpoint %d from %s', step, checkpoint.checkpoint_dir(source))
  return net, variables, meta


def reading_layer(layer: str, history: dict | None) -> tuple[str, str]:
  """The CNN layer k-means reads: config.segment.layer, with 'auto' decided by the training's check.

  'auto' (the recommended method) reads the embedding where the trained features of the training
  patches hold K distinct groups (history['groups'], groups.structure, written when training ends),
  and the hidden layer where they do not. Without groups, the features run along one continuum (on
  MNI152 the T1 intensity), and k-means' cuts along it follow how the features space it: the
  triplet loss spaces JULE's final clusters, of about equal size, about evenly, so k-means on the
  embedding cuts about equal shares of the patches (README "Honest reading"); the hidden layer,
  which no margin shapes, keeps the input's metric. Where the groups are there, the embedding
  separates them better (the demo: -0.027 on every seed reading the hidden layer).

  Args:
    layer: config.segment.layer ('embedding', 'hidden' or 'auto').
    history: the checkpoint's training history (its meta), or None.

  Returns:
    ('embedding' or 'hidden', why: the reason in words, for the log and the report).
  """
  if layer != 'auto':
    return layer, f'segment.layer = {layer!r}'
  found = (history or {}).get('groups')
  if not isinstance(found, dict):
    return 'embedding', (
      "segment.layer = 'auto' and the checkpoint's training has no group check (trained before "
      'it existed): the embedding'
    )
  if found['distinct']:
    return 'embedding', (
      f"segment.layer = 'auto': the trained features of the training patches hold "
      f'{found["k"]} distinct groups (ratio {found["ratio"]:.2f}), which the embedding separates'
    )
  return 'hidden', (
    f"segment.layer = 'auto': the trained features of the training patches hold fewer than "
    f'{found["k"]} distinct groups (ratio {found["ratio"]:.2f}): along one continuum the '
    "embedding's even spacing of JULE's clusters would set the cuts, the hidden layer keeps the "
    "input's metric"
  )


def _norm(v):
  return list(v) if isinstance(v, (list, tuple)) else v


def fill_slab(painted: np.ndarray, domain: np.ndarray) -> np.ndarray:
  """Every domain voxel labelled: a 0 inside the domain takes its nearest painted voxel's label.

  Voxels within w/2 of the volume's faces have no centred patch; they take the label of the
  nearest grid block (Euclidean, voxel units). Voxels outside the domain become 0.

  Args:
    painted: uint8 labels of a slab with a halo (grid.paint_slab), 0 = not covered.
    domain: bool, same shape: voxels that must be labelled.

  Returns:
    uint8 labels, same shape.
  """
  out = np.where(domain, painted, 0).astype(np.uint8)
  hole = domain & (out == 0)
  covered = out > 0
  if hole.any() and covered.any():
    idx = ndimage.distance_transform_edt(~covered, return_distances=False, return_indices=True)
    out[hole] = out[tuple(i[hole] for i in idx)]
  return out


def _write_slabs(store, n: int, depth: int, labels_of, domain_of=None, halo: int = 0) -> None:
  """Writes planes [0, n) of a label volume slab by slab, each filled over its domain (fill_slab).

  Args:
    store: the open tensorstore of the output (uint8).
    n: planes along axis 0.
    depth: planes per written slab.
    labels_of: (a, b) -> uint8 labels of planes [a, b), 0 = not covered.
    domain_of: (a, b, labels) -> bool voxels of planes [a, b) that must be labelled; None: no fill.
    halo: planes read on each side of a slab for the fill (its nearest labels may lie there).
  """
  for z0 in range(0, n, depth):
    z1 = min(z0 + depth, n)
    a, b = (max(0, z0 - halo), min(n, z1 + halo)) if domain_of is not None else (z0, z1)
    block = labels_of(a, b)
    if domain_of is not None:
      block = fill_slab(block, domain_of(a, b, block))
    store[z0:z1].write(block[z0 - a : z1 - a]).result()


def write_labels(store, inputs, centres: np.ndarray, labels: np.ndarray, stride: int) -> None:
  """Paints the grid labels into the label volume slab by slab (and fills, if config.segment.fill).

  Args:
    store: the open tensorstore of the output (volume shape, uint8).
    inputs: pipeline.Inputs (image, interior, config).
    centres: [M, 3] grid centres sorted by axis 0.
    labels: [M] labels 1..K.
    stride: s.
  """
  c, img = inputs.config, inputs.image

  def domain_of(a, b, _):
    values = np.asarray(img.store[a:b].read().result())
    coords = (np.arange(a, b), np.arange(img.shape[1]), np.arange(img.shape[2]))
    return patches.in_domain(
      values, c.data.threshold, c.data.foreground, inputs.interior, coords, envelope=True
    )

  _write_slabs(
    store,
    img.shape[0],
    c.data.cache_chunk,
    lambda a, b: grid.paint_slab(a, b, img.shape, centres, labels, stride),
    domain_of if c.segment.fill else None,
    c.patches.patch_size,
  )


def write_back(store, labels, inputs) -> None:
  """Writes working-grid labels onto the input's grid (jule3d/working.py), slab by slab.

  Each input voxel takes its nearest working voxel's label; with config.segment.fill, foreground
  voxels left at 0 (a structure thinner than a working voxel) take their nearest labelled voxel's.

  Args:
    store: the open tensorstore of the output (input shape, uint8).
    labels: the labels on the working grid (a Volume).
    inputs: pipeline.Inputs with `grid` and `original`.
  """
  c, src, to_working = inputs.config, inputs.original, inputs.grid

  def domain_of(a, b, block):
    values = np.asarray(src.store[a:b].read().result())
    return patches.foreground(values, c.data.threshold, c.data.foreground) | (block > 0)

  _write_slabs(
    store,
    src.shape[0],
    c.data.cache_chunk,
    lambda a, b: working.to_input(labels, to_working, a, b),
    domain_of if c.segment.fill else None,
    c.patches.patch_size,
  )


def segment(inputs, workdir: str, overwrite: bool = False) -> dict:
  """Runs phase 2 and writes segmentation.zarr and segmentation.nii.gz into the workdir.

  Args:
    inputs: pipeline.Inputs.
    workdir: run directory.
    overwrite: replace existing outputs.

  Returns:
    Summary dict (grid size, seconds per stage).
  """
  c = inputs.config
  outputs = [
    os.path.join(workdir, n) for n in (SEGMENTATION, SEGMENTATION_NIFTI, SEGMENTATION_NRRD)
  ]
  for path in outputs:
    if os.path.exists(path) and not overwrite:
      raise UserError(f'{path!r} already exists: pass --overwrite to replace it.')
  net, variables, meta = load_model(c, workdir)
  layer, why = reading_layer(c.segment.layer, meta.get('history'))
  reading = {'layer': layer, 'why': why} if c.segment.features == 'cnn' else None  # else hand-made
  if reading:
    logging.info("k-means reads the CNN's %s: %s", layer, why)
  net = net.clone(output=layer)
  w, s, k = c.patches.patch_size, c.segment.stride, c.segment.num_segments
  t0 = time.time()
  centres = grid.centres(
    inputs.image, w, s, c.data.threshold, c.data.foreground, interior=inputs.interior
  )
  grid.require(len(centres), k, s)
  flops = dense.flops_per_grid_patch(c.model, w, s, inputs.image.shape)
  path = c.segment.feature_path
  if path == 'auto':
    path = dense.choose_path(c.model, w, s, inputs.image.shape, num_centres=len(centres))
  logging.info(
    'segmenting %d grid patches (stride %d, %d^3) on the %s path; forward MFLOP per grid patch: '
    'per-patch %.2f, dense %.2f',
    len(centres),
    s,
    w,
    path,
    flops['per_patch'] / 1e6,
    flops['dense'] / 1e6,
  )
  feats = _grid_features(inputs, workdir, net, variables, meta, centres, path)
  if feats is None:
    return {'grid_patches': int(len(centres)), 'feature_path': path, 'process': jax.process_index()}
  t_feat = time.time() - t0
  labels, found = _grid_labels(c, centres, feats)
  t_km = time.time() - t0 - t_feat
  _write_outputs(inputs, workdir, outputs, centres, labels, found, reading)
  if c.segment.save_features:
    with files.atomic_path(os.path.join(workdir, FEATURES), '.npz') as tmp:
      np.savez(tmp, centres=centres, features=feats, labels=labels)
  shutil.rmtree(os.path.join(workdir, SEGMENT_PROGRESS), ignore_errors=True)
  summary = {
    'grid_patches': int(len(centres)),
    'feature_path': path,
    'mflop_per_grid_patch': {k: round(flops[k] / 1e6, 3) for k in ('per_patch', 'dense')},
    'features_s': round(t_feat, 3),
    'kmeans_s': round(t_km, 3),
    'write_s': round(time.time() - t0 - t_feat - t_km, 3),
  }
  logging.info('segmentation written to %s, %s and %s: %s', *outputs, summary)
  return summary


def _grid_features(inputs, workdir, net, variables, meta, centres, path: str):
  """The grid's features on `path` ('dense' or 'per_patch') in resumable parts, or an ablation's.

  Returns:
    [M, D] float32 in the primary process; None in the others.
  """
  c = inputs.config
  w, s = c.patches.patch_size, c.segment.stride
  if c.segment.features != 'cnn':
    logging.info('ablation: k-means on %s features instead of the CNN', c.segment.features)
    return features.hand_made_features(
      inputs, centres, c.segment.features, meta['mean'], meta['std']
    )
  embed_fn = model.make_embed_fn(net)

  def compute(part: np.ndarray) -> np.ndarray:
    return features.grid_features(
      inputs.patch_source,
      part,
      w,
      embed_fn,
      variables,
      meta['mean'],
      meta['std'],
      c.model.feature_batch_size,
      slab_depth=s,
    )

  period = meta['history']['periods'][-1]['period']
  key = f'{meta["fingerprint"]}-{period}-{w}-{s}-{len(centres)}-{net.output}'
  blocks = dense.block_planes(net, w, s, inputs.image.shape) if path == 'dense' else 1
  per_part = grid.part_planes(c.segment.part_planes, w, s, blocks)
  progress = os.path.join(workdir, SEGMENT_PROGRESS)
  if path == 'dense':
    # The dense path runs one part per device: parts are dealt over every local device.
    def compute_on(device):
      on_device = jax.device_put(variables, device)
      return lambda part: dense.dense_grid_features(
        inputs.patch_source, part, w, net, on_device, meta['mean'], meta['std'], stride=s
      )

    devices = jax.local_devices()
  else:  # the per-patch path already splits each batch over the local devices
    compute_on, devices = (lambda _: compute), [None]
  return features.features_by_parts(compute_on, devices, centres, progress, key, per_part, w, s)


def _grid_labels(c, centres: np.ndarray, feats: np.ndarray) -> tuple[np.ndarray, dict]:
  """k-means of the grid features, then (segment.smoothing > 0) the Potts step on the grid.

  Also returns groups.structure of the features (logged, and kept with the segmentation).
  """
  s = c.segment.stride
  fit = (c.seed, c.segment.kmeans_restarts, c.segment.kmeans_max_fit)
  labels, dist = groups.kmeans_labels(feats, c.segment.num_segments, *fit)
  found = groups.structure(feats, dist, *fit)
  groups.log_structure(found, 'the grid features')
  if c.segment.smoothing > 0:
    before = labels
    labels, sweeps = regularise.potts_icm(
      centres, labels, regularise.unary_terms(dist), s, c.segment.smoothing
    )
    logging.info(
      'Potts smoothing (beta %.3g): %d sweeps, %.2f%% of the grid relabelled',
      c.segment.smoothing,
      sweeps,
      100.0 * np.mean(labels != before),
    )
  return labels, found


def _write_outputs(inputs, workdir: str, outputs, centres, labels, found: dict, reading) -> None:
  """Paints the labels and writes segmentation.zarr (groups.structure as `groups`, the layer read
  and why as `reading` among its attributes), then its NIfTI and NRRD copies."""
  out_zarr, out_nii, out_nrrd = outputs
  c, img, out = inputs.config, inputs.image, inputs.input_volume
  s, chunk = c.segment.stride, c.data.cache_chunk
  if inputs.grid is None:
    with volume.zarr_writer(
      out_zarr, img.shape, np.uint8, img.spacing, img.affine, chunk, groups=found, reading=reading
    ) as store:
      write_labels(store, inputs, centres, labels, s)
  else:  # painted on the working grid, then written back onto the input's (jule3d/working.py)
    on_grid = os.path.join(workdir, SEGMENT_PROGRESS, 'working-segmentation.zarr')
    os.makedirs(os.path.dirname(on_grid), exist_ok=True)
    with volume.zarr_writer(on_grid, img.shape, np.uint8, img.spacing, img.affine, chunk) as store:
      write_labels(store, inputs, centres, labels, s)
    with volume.zarr_writer(
      out_zarr, out.shape, np.uint8, out.spacing, out.affine, chunk, groups=found, reading=reading
    ) as store:
      write_back(store, volume.open_volume(on_grid, name='working segmentation'), inputs)
  seg = volume.open_volume(out_zarr, name='segmentation')
  volume.write_nifti(out_nii, seg, out.spacing, out.affine)
  # Without a file affine both outputs use diag(spacing) (RAS), so that they overlay each other.
  affine = out.affine if out.affine is not None else np.diag([*map(float, out.spacing), 1.0])
  volume.write_itk(out_nrrd, seg, out.spacing, affine)
