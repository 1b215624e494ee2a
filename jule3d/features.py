"""Features of patches: what the clustering and k-means see.

  training patches  `initial_features` (period 0: a hand-made function of the patch,
                    jule3d/descriptors.py) and `extract_features` (the CNN's)
  the stride grid   `grid_features` (per patch, streamed from the volume), or the dense path
                    (jule3d/dense.py); `resumable_features` / `features_by_parts` cut either into
                    parts saved in the workdir, so that a killed segmentation resumes, dealt over
                    devices and processes
  ablations         `hand_made_features`: the centre intensity or the period-0 descriptor instead of
                    the CNN's features, through the same pipeline
Every patch is normalised by patches.normalise with the statistics stored with the model, and
every per-patch CNN call goes through one padded batch loop, `embed_batches`.
"""

import concurrent.futures
import os
import time

import jax
import numpy as np
from absl import logging

from jule3d import descriptors, files, grid, patches, progress, sharding


def grid_features(
  image,
  centres: np.ndarray,
  patch_size: int,
  embed_fn,
  variables,
  mean: float,
  std: float,
  batch_size: int,
  slab_depth: int = 1,
) -> np.ndarray:
  """CNN features at every grid centre, streamed: read a slab of patches, embed, keep the features.

  Memory: one read box (slab_depth grid planes + a patch of halo), its patches and fewer than a
  batch held over from earlier slabs, in the volume's dtype; float32 copies are made per batch only.

  Args:
    image: the Volume.
    centres: [M, 3] grid centres in raster order.
    patch_size: w.
    embed_fn: model.make_embed_fn(net).
    variables: restored {'params', 'batch_stats'}.
    mean: normalisation mean stored with the model.
    std: normalisation std stored with the model.
    batch_size: patches per CNN call (fixed: one compile; the last batch is padded).
    slab_depth: axis-0 voxels of centres per read (the grid stride reads one grid plane at a time).

  Returns:
    [M, D] float32 (D: NetSpec.width of the network).
  """
  m = sharding.mesh(local=True)  # each process embeds its own patches
  variables = jax.device_put(variables, sharding.replicated(m))
  batches = _streamed_batches(image, centres, patch_size, mean, std, batch_size, slab_depth)
  return embed_batches(embed_fn, variables, batches, len(centres), batch_size, m)


def _streamed_batches(image, centres, patch_size, mean, std, batch_size: int, slab_depth: int):
  """(indices, gather) batches of the grid centres for embed_batches, read slab by slab.

  Batches are filled across slabs: a grid plane of a small volume can hold fewer patches than a
  batch, and padding each plane's last batch wasted most of every call there (measured: paper CNN,
  64^3 volume, stride 5, 64 patches a plane: 28 instead of ~120 patches/s).
  """
  held_idx, held = [], []  # read, not yet embedded: fewer than a batch
  read, next_log, t0 = 0, 0.1, time.time()
  for idx, raw in patches.iter_patches(image, centres, patch_size, slab_depth):
    held_idx.append(idx)
    held.append(raw)
    read += len(idx)
    count = sum(len(i) for i in held_idx)
    last = read == len(centres)
    if count < batch_size and not last:
      continue
    idx, raw = np.concatenate(held_idx), np.concatenate(held)
    full = count if last else count // batch_size * batch_size
    for i in range(0, full, batch_size):
      yield (
        idx[i : i + batch_size],
        patches.normalise(raw[i : i + batch_size], mean, std).__getitem__,
      )
    held_idx, held = [idx[full:]], [raw[full:]]
    done = read - (count - full)
    if done >= next_log * len(centres):
      rate = done / max(time.time() - t0, 1e-9)
      logging.info('features: %d/%d grid patches (%.0f patches/s)', done, len(centres), rate)
      next_log = done / len(centres) + 0.1


def resumable_features(
  compute,
  centres: np.ndarray,
  progress_dir: str,
  key: str,
  planes_per_part: int,
  *,
  patch_size: int,
  stride: int,
  owned=None,
) -> np.ndarray | None:
  """Features of the grid in parts of a few grid planes, each saved on completion.

  A killed segmentation resumes at the first part not on disk instead of starting over. Parts are
  kept under `progress_dir/key` (key = checkpoint, patch size, stride and grid size, so a part is
  never reused for another model or grid) and written atomically. Part p holds the centres on grid
  planes [p * planes_per_part, (p + 1) * planes_per_part) of axis 0 (grid.parts), so parts line up
  with the dense path's blocks when planes_per_part is a multiple of theirs.

  Args:
    compute: centres [n, 3] -> features [n, D].
    centres: [M, 3] grid centres in raster order.
    progress_dir: folder for the parts (removed by the caller once the output is written).
    key: identity of this grid and model.
    planes_per_part: grid planes of axis 0 per part.
    patch_size: w of the grid (grid plane 0 is at w // 2).
    stride: grid step.
    owned: part index -> whether this process computes it (several processes share the parts);
      None: all of them.

  Returns:
    [M, D] float32 features, or None when parts owned by other processes are not on disk yet.
  """
  folder = os.path.join(progress_dir, key)
  os.makedirs(folder, exist_ok=True)
  part = grid.parts(centres, patch_size, stride, planes_per_part)
  bounds = np.flatnonzero(np.diff(part)) + 1
  bounds = np.concatenate([[0], bounds, [len(centres)]]) if len(centres) else np.zeros(1, int)
  parts, complete = [], True
  shown = None
  for a, b in zip(bounds[:-1], bounds[1:], strict=True):
    i = int(part[a])
    path = os.path.join(folder, f'part_{i:06d}.npy')
    if os.path.exists(path):
      parts.append(np.load(path))
      continue
    if shown is None:  # the rate counts only the parts computed now (not those on disk)
      shown = progress.Progress('grid features', len(centres), 'patches', done=int(a))
    if owned is not None and not owned(i):
      complete = False
      continue
    t0 = time.time()
    out = np.asarray(compute(centres[a:b]), np.float32)
    logging.info('feature part %d: %d grid patches in %.1fs', i, b - a, time.time() - t0)
    shown.update(int(b))
    files.write_npy_atomic(path, out)
    parts.append(out)
  if not complete:
    return None
  return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def features_by_parts(
  compute_on,
  devices: list,
  centres: np.ndarray,
  progress: str,
  key: str,
  per_part: int,
  patch_size: int,
  stride: int,
) -> np.ndarray | None:
  """Grid features in resumable parts (resumable_features), dealt over devices and processes.

  Worker j = (process, local device) computes parts j, j + W, j + 2W, ... (W workers in all), the
  local devices in threads; then the primary process gathers every part from the shared workdir.

  Args:
    compute_on: device (an entry of `devices`) -> (centres -> features).
    devices: this process's devices to deal parts over ([None]: one worker per process).
    centres: [M, 3] grid centres in raster order.
    progress: folder for the parts.
    key: identity of the grid and model (resumable_features).
    per_part: grid planes per part.
    patch_size: w of the grid.
    stride: its step.

  Returns:
    [M, D] features in the primary process; None in the others.
  """
  procs, me, n = jax.process_count(), jax.process_index(), len(devices)
  grid_of = {'patch_size': patch_size, 'stride': stride}
  workers = procs * n
  if workers > 1:

    def work(d: int) -> None:
      j = me * n + d
      owned = lambda i: i % workers == j  # noqa: E731
      resumable_features(
        compute_on(devices[d]), centres, progress, key, per_part, owned=owned, **grid_of
      )

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
      list(pool.map(work, range(n)))  # list(): re-raises a worker's exception here
    sharding.barrier('jule3d-features')
    if not sharding.is_primary():
      return None
  return resumable_features(compute_on(devices[0]), centres, progress, key, per_part, **grid_of)


def hand_made_features(inputs, centres: np.ndarray, kind: str, mean: float, std: float):
  """Ablation features of the grid patches (config.segment.features other than 'cnn').

  Args:
    inputs: pipeline.Inputs.
    centres: [M, 3] grid centres.
    kind: 'intensity' (the centre voxel) or 'initial' (the period-0 'texture' or 'cue' descriptor,
      descriptors.volume_function: the whole volume in memory; the cue rule picks its column on
      the grid).
    mean: normalisation mean of the training patches.
    std: normalisation std of the training patches.

  Returns:
    [M, D] float32.
  """
  c = inputs.config
  if kind == 'intensity':
    img = inputs.image
    vals = img.store.vindex[centres[:, 0], centres[:, 1], centres[:, 2]].read().result()
    return patches.normalise(np.asarray(vals), mean, std)[:, None]
  vol = inputs.patch_source
  x = patches.normalise(vol.read((0, 0, 0), vol.shape), mean, std)
  kind = c.cluster.initial_features
  feats = descriptors.volume_function(kind)(x, c.patches.patch_size)[tuple(centres.T)]
  return descriptors.finish(kind, feats, c.segment.num_segments)


# One jitted gather for every call (jitting a lambda inside the function compiled it per period).
_take = jax.jit(lambda data, idx: data[idx])


def _padded_rows(n: int, batch_size: int):
  """The rows of a batch of n patches that fill one CNN call: all of them (a full batch), or rows
  0..n-1 and then row n-1 again up to batch_size (a short one)."""
  if n == batch_size:
    return slice(None)
  return np.minimum(np.arange(batch_size), n - 1).astype(np.int32)


def embed_batches(embed_fn, variables, batches, num: int, batch_size: int, m) -> np.ndarray:
  """The one padded batch loop: CNN features of `num` patches, batch by batch.

  Every call of the CNN gets exactly `batch_size` patches (one compile): a shorter batch is padded
  by repeating its last patch (eval-mode BatchNorm: rows are independent, and the padding's
  features are dropped).

  Args:
    embed_fn: model.make_embed_fn(net).
    variables: {'params', 'batch_stats'}.
    batches: (indices into the output, gather) pairs, one per batch of n <= batch_size patches:
      gather(rows) gives the normalised patches at those rows of the batch (host or device).
    num: rows of the output.
    batch_size: patches per CNN call.
    m: the mesh each batch is split over.

  Returns:
    [num, D] float32, D the network's output width (None when `batches` is empty).
  """
  feats = None
  for idx, gather in batches:
    n = len(idx)
    x = gather(_padded_rows(n, batch_size))
    out = sharding.to_host(embed_fn(variables, sharding.put_batch(x, m)))
    if feats is None:
      feats = np.empty((num, out.shape[1]), np.float32)
    feats[idx] = out[:n]
  return feats


def extract_features(embed_fn, variables, data: jax.Array, batch_size: int) -> np.ndarray:
  """CNN features of every patch in `data`, in fixed-size batches (one compile; last batch padded).

  Args:
    embed_fn: model.make_embed_fn(model).
    variables: {'params', 'batch_stats'}.
    data: [N, w, w, w] normalised patches (device or host).
    batch_size: patches per call.

  Returns:
    [N, D] float32 numpy array (D: the network's output width).
  """
  n = data.shape[0]

  def batches():  # one device gather per batch, of its padded rows: one shape, one compile
    for i in range(0, n, batch_size):
      idx = np.arange(i, min(i + batch_size, n), dtype=np.int32)
      yield idx, lambda rows, idx=idx: _take(data, idx[rows])

  return embed_batches(embed_fn, variables, batches(), n, batch_size, sharding.mesh())


def initial_features(c, data: jax.Array) -> np.ndarray:
  """Period-0 features of the training patches (config.cluster.initial_features; descriptors.py)."""
  return descriptors.initial_features(
    c.cluster.initial_features, data, sharding.to_host, c.segment.num_segments
  )
