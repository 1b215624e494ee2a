"""Dense grid features (method §5): the CNN slid over the volume, every convolution computed once.

Neighbouring grid patches overlap almost entirely, so embedding them one by one repeats most of
the convolution work. Here the network runs fully convolutionally over blocks of the volume and
gives, at every grid corner (centre - w//2), exactly the per-patch feature:
  conv1 is computed at every voxel of the block;
  the stride-p pooling splits the conv1 map into p^3 phases (offset r in 0..p-1 per axis; a
    patch whose corner is q pools the phase r = q mod p): each phase is pooled with stride p and
    convolved by conv2 and conv3 undilated. This is the "dilated convolution after pooling"
    network evaluated phase by phase (same values, same FLOPs), and only the phases that hold a
    grid corner are computed: for a stride that p divides, one phase of p^3;
  fc1 is a (dilated) convolution whose kernel covers the last conv map of one patch: it is
    evaluated only at the grid corners, by gathering each corner's e^3 x C window (flatten order;
    the 'mean' head averages it per channel) and, with a centre path, the patch's central voxels
    from the input block, then one matmul, followed by fc2 and the L2 normalisation;
  eval-mode BatchNorm is the per-channel affine scale * rsqrt(var + eps), applied after each conv.

Geometry: the grid is a lattice (origin w//2, step g per axis); the volume is tiled into blocks of
t lattice points per axis (corners s*i, i < t), each block reading (t-1)*g + w voxels per axis, so
every block has the same static shape (one compile; edge blocks are zero-padded, and padding only
reaches lattice points whose patch would leave the volume, which are never requested). Blocks
stream along axis 0 as slabs (the next read in flight); blocks without a requested centre are
skipped. Block size comes from a memory budget (a few hundred MB for the paper model).
"""

import dataclasses
import functools
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jule3d import convolution, grid, model, patches
from jule3d.volume import read_ahead

_DEFAULT_MEMORY_MB = 384


@dataclasses.dataclass(frozen=True)
class _Block:
  """A block of t[a] lattice points per axis, spaced `step` voxels."""

  net: model.NetSpec
  step: int
  t: tuple[int, int, int]

  def in_shape(self) -> tuple[int, int, int]:
    """Voxels read per axis: the corners' span plus one patch."""
    return tuple((n - 1) * self.step + self.net.patch_size for n in self.t)

  def phases(self, axis: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """[(phase r, lattice indices i of that phase, their pooled indices (s*i - r) // p)] on an axis."""
    p = self.net.pool_size
    i = np.arange(self.t[axis])
    q = self.step * i
    return [(r, i[q % p == r], (q[q % p == r] - r) // p) for r in range(p) if np.any(q % p == r)]


def _block_cost(b: _Block) -> tuple[int, int]:
  """(forward FLOPs, peak bytes estimate) of one block."""
  n = b.net
  k = n.kernel_size
  c1, c2, c3 = n.conv_features
  e4 = n.edges()[3]
  l1 = [s - k + 1 for s in b.in_shape()]
  flops = 2 * math.prod(l1) * k**3 * c1
  peak_conv = 0  # elements live through the phase convolutions
  pooled_total = 0
  # Phase extents per axis (the pooled span that phase's corners need).
  spans = []
  for a in range(3):
    spans.append([int(j.max() - j.min()) + n.edges()[1] for _, _, j in b.phases(a)])
  for combo in itertools.product(*spans):
    o2 = [s - k + 1 for s in combo]
    o3 = [s - k + 1 for s in o2]
    flops += 2 * math.prod(o2) * k**3 * c1 * c2 + 2 * math.prod(o3) * k**3 * c2 * c3
    pooled_total += math.prod(combo) * c1
    # XLA's buffer assignment keeps every phase's im2col columns alive together (compiled
    # temp size measured: ~the sum over phases), so they add up.
    if n.impl == 'im2col':
      peak_conv += math.prod(o2) * k**3 * c1
    peak_conv += math.prod(o2) * c2 + math.prod(o3) * c3
  corners = math.prod(b.t)
  flat = model.fc1_inputs(c3, e4, n.head, n.centre_size)
  flops += corners * (2 * flat * n.hidden_dim + 2 * n.hidden_dim * n.embed_dim)
  elems = (
    math.prod(b.in_shape())
    + 2 * math.prod(l1) * c1
    + pooled_total
    + peak_conv
    + corners * (flat + n.hidden_dim)
  )
  return flops, 4 * elems


def _plan(
  n: model.NetSpec,
  step: int,
  cells: tuple[int, int, int],
  memory_mb: float,
  slab_planes: int | None,
) -> _Block:
  """The largest block (whole Y/X rows first, then fewer planes) whose estimate fits the budget."""
  budget = memory_mb * 2**20

  def fits(t):
    return _block_cost(_Block(n, step, t))[1] <= budget

  tz = min(cells[0], slab_planes) if slab_planes else None
  # Grow a cube-ish block: largest tile edge whose block fits, then give axis 0 what remains.
  t = [1, 1, 1]
  if tz is not None:
    t[0] = tz
  while True:
    grown = False
    for a in (2, 1) if tz is not None else (2, 1, 0):
      cand = list(t)
      cand[a] = min(cells[a], t[a] * 2)
      if cand[a] > t[a] and fits(tuple(cand)):
        t = cand
        grown = True
    if not grown:
      break
  # Refine each axis upwards one by one (doubling can overshoot coarsely).
  for a in (2, 1) if tz is not None else (2, 1, 0):
    while t[a] < cells[a]:
      cand = list(t)
      cand[a] += max(1, t[a] // 8)
      cand[a] = min(cand[a], cells[a])
      if not fits(tuple(cand)):
        break
      t = cand
  # Even split: a last block barely filled wastes its whole compute.
  for a in range(3):
    nb = -(-cells[a] // t[a])
    t[a] = -(-cells[a] // nb)
  return _Block(n, step, tuple(t))


def _affine(params, stats, name: str, eps: float):
  scale = params[name]['scale'] * jax.lax.rsqrt(stats[name]['var'] + eps)
  return scale, params[name]['bias'] - stats[name]['mean'] * scale


@functools.partial(jax.jit, static_argnames='block')
def _block_features(block: _Block, variables, x: jax.Array, mean, std) -> jax.Array:
  """Features of every lattice point of one block: [t0 * t1 * t2, NetSpec.width], raster order."""
  n = block.net
  p = n.pool_size
  _, e2, _, e4 = n.edges()
  cdt = jnp.bfloat16 if n.dtype == 'bfloat16' else jnp.float32
  conv = convolution.conv3d_fn(n.impl)
  params, stats = variables['params'], variables['batch_stats']

  def layer(h, i):
    name = f'conv{i}'
    a, b = _affine(params, stats, f'bn{i}', n.bn_epsilon)
    y = conv(h, params[name]['kernel'], cdt) + params[name]['bias']
    return jax.nn.relu(y * a + b)

  x = patches.normalise(x, mean, std)[None, ..., None]
  h1 = layer(x, 1)
  rows, order = [], []
  phases = [block.phases(a) for a in range(3)]
  for (rz, iz, jz), (ry, iy, jy), (rx, ix, jx) in itertools.product(*phases):
    lo = [int(j.min()) for j in (jz, jy, jx)]
    hi = [int(j.max()) + e2 for j in (jz, jy, jx)]
    start = [r + p * a for r, a in zip((rz, ry, rx), lo, strict=True)]
    stop = [r + p * b for r, b in zip((rz, ry, rx), hi, strict=True)]
    ph = h1[:, start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]]
    h3 = layer(layer(model.max_pool3d(ph, p), 2), 3)[0]
    # Each corner's e4^3 window of the last conv map, in the per-patch flatten order.
    win = [(j - a)[:, None] + np.arange(e4) for j, a in zip((jz, jy, jx), lo, strict=True)]
    g = h3[
      win[0][:, None, None, :, None, None],
      win[1][None, :, None, None, :, None],
      win[2][None, None, :, None, None, :],
    ]
    g = g.reshape(len(jz) * len(jy) * len(jx), -1)
    if n.head == 'mean':  # the window's mean per channel (model.JuleCNN's 'mean' head)
      g = jnp.mean(g.reshape(g.shape[0], e4**3, -1), axis=1)
    if n.centre_size:  # the patch's central voxels (model.JuleCNN's centre pathway)
      c0 = n.patch_size // 2 - n.centre_size // 2
      cw = [(block.step * i + c0)[:, None] + np.arange(n.centre_size) for i in (iz, iy, ix)]
      cv = x[0, ..., 0][
        cw[0][:, None, None, :, None, None],
        cw[1][None, :, None, None, :, None],
        cw[2][None, None, :, None, None, :],
      ]
      g = jnp.concatenate([g, cv.reshape(g.shape[0], -1)], axis=1)
    rows.append(g)
    flat = (iz[:, None, None] * block.t[1] + iy[None, :, None]) * block.t[2] + ix[None, None, :]
    order.append(flat.reshape(-1))
  f = jnp.concatenate(rows) if len(rows) > 1 else rows[0]
  inv = np.argsort(np.concatenate(order))
  f = f[inv]

  def dense(h, name):
    y = jnp.dot(
      h.astype(cdt), params[name]['kernel'].astype(cdt), preferred_element_type=jnp.float32
    )
    return y + params[name]['bias']

  f = jax.nn.relu(dense(f, 'fc1'))
  if n.output == 'hidden':  # model.JuleCNN's output='hidden'
    return f
  return model.l2_normalize(dense(f, 'fc2'))


def _lattice_step(centres: np.ndarray, h: int, stride: int | None) -> int:
  """The grid step: `stride` if given (checked), else the gcd of the centres' offsets from w//2."""
  off = centres - h
  g = int(np.gcd.reduce(off.reshape(-1))) if off.size else 0
  if stride is None:
    return max(g, 1)
  if g % stride:
    raise ValueError(
      f'dense_grid_features: the centres are not on the stride-{stride} grid starting at '
      f'patch_size // 2 = {h} (as grid.centres builds it).'
    )
  return stride


def _check(volume, centres: np.ndarray, patch_size: int, std: float) -> None:
  if centres.ndim != 2 or centres.shape[1] != 3:
    raise ValueError(f'dense_grid_features: centres must be an [M, 3] array, got {centres.shape}.')
  if patch_size < 1 or patch_size % 2 == 0:
    raise ValueError(f'dense_grid_features: patch_size must be odd and >= 1, got {patch_size}.')
  if not (np.isfinite(std) and std > 0):
    raise ValueError(f'dense_grid_features: the normalisation std must be > 0, got {std}.')
  if len(centres):
    lo, hi = patches.centre_bounds(volume.shape, patch_size)
    bad = np.flatnonzero(np.any((centres < lo) | (centres >= hi), axis=1))
    if bad.size:
      raise ValueError(
        f'dense_grid_features: centre {centres[bad[0]].tolist()} (row {bad[0]}) puts its '
        f'{patch_size}^3 patch outside the volume of shape {tuple(volume.shape)}.'
      )


def block_planes(
  net: model.JuleCNN,
  patch_size: int,
  stride: int,
  shape: tuple[int, int, int],
  memory_mb: float = _DEFAULT_MEMORY_MB,
) -> int:
  """Grid planes of axis 0 per block that `dense_grid_features` uses on a volume of `shape`.

  Blocks are laid on the volume's grid from its first plane, whatever the centres: a caller that
  splits the centres into groups of whole blocks (multiples of this many grid planes) computes
  every block once.

  Args:
    net: the network.
    patch_size: odd patch edge w.
    stride: the grid step.
    shape: the volume shape.
    memory_mb: the same budget as given to dense_grid_features.

  Returns:
    The block's extent in grid planes along axis 0.
  """
  cells = grid.shape_of(shape, patch_size, stride)
  return int(_plan(model.net_spec(net, patch_size), stride, cells, memory_mb, None).t[0])


def dense_grid_features(
  volume,
  centres: np.ndarray,
  patch_size: int,
  net: model.JuleCNN,
  variables: dict[str, Any],
  mean: float,
  std: float,
  *,
  stride: int | None = None,
  slab_planes: int | None = None,
  memory_mb: float = _DEFAULT_MEMORY_MB,
) -> np.ndarray:
  """Eval-mode CNN features of the patches at `centres`, computed fully convolutionally.

  Equal (float32 rounding) to embedding each normalised patch with `model.embed`, as
  `features.grid_features` does, for any stride, at a fraction of the cost for small strides.

  Args:
    volume: a jule3d.volume.Volume (needs .store, .shape).
    centres: int [M, 3] patch centres on a grid (any order; raster order from
      grid.centres is the usual case).
    patch_size: odd patch edge w.
    net: the network (its conv_impl and dtype are honoured).
    variables: {'params', 'batch_stats'}.
    mean: normalisation mean stored with the model.
    std: normalisation std stored with the model.
    stride: the grid step; None infers the coarsest lattice from w//2 that holds all centres.
    slab_planes: grid planes of axis 0 per slab (block); None sizes blocks from `memory_mb`.
    memory_mb: working-set budget per block (estimate) when choosing the block size.

  Returns:
    [M, width] float32 (NetSpec.width: the embedding, or the hidden layer with net.output =
    'hidden'), row i the feature of centres[i].

  Raises:
    ValueError: malformed centres, a centre whose patch leaves the volume, centres off the given
      stride grid, or a non-positive std: the caller's inconsistency, not the user's input.
  """
  centres = np.asarray(centres)
  _check(volume, centres, patch_size, std)
  n = model.net_spec(net, patch_size)
  if len(centres) == 0:
    return np.zeros((0, n.width), np.float32)
  h = patch_size // 2
  step = _lattice_step(centres, h, stride)
  cells = grid.shape_of(volume.shape, patch_size, step)
  block = _plan(n, step, cells, memory_mb, slab_planes)
  bidx, local_flat, groups = _block_groups(centres, patch_size, step, block.t, cells)
  feats = np.empty((len(centres), n.width), np.float32)
  _run_blocks(volume, block, variables, step, bidx, local_flat, groups, mean, std, feats)
  return feats


def _block_groups(centres: np.ndarray, patch_size: int, step: int, t, cells):
  """Which block holds each centre, its row in the block's output, and the centres per block.

  Returns:
    (bidx [M, 3] block index, local_flat [M] raster row within the block, groups: index arrays of
    the centres of each block in block raster order).
  """
  t = np.asarray(t)
  lat = grid.index(centres, patch_size, step)
  bidx = lat // t
  local = lat % t
  local_flat = (local[:, 0] * t[1] + local[:, 1]) * t[2] + local[:, 2]
  nb = [-(-g // tt) for g, tt in zip(cells, t.tolist(), strict=True)]
  bflat = (bidx[:, 0] * nb[1] + bidx[:, 1]) * nb[2] + bidx[:, 2]
  order = np.argsort(bflat, kind='stable')
  cuts = np.flatnonzero(np.diff(bflat[order])) + 1
  return bidx, local_flat, np.split(order, cuts)


def _run_blocks(volume, block, variables, step, bidx, local_flat, groups, mean, std, feats) -> None:
  """Every block's features into `feats`, slab by slab along axis 0 with the next slab in flight."""
  shape_in = block.in_shape()
  span = [tt * step for tt in block.t]  # voxels between consecutive blocks' first corners
  mean32, std32 = np.float32(mean), np.float32(std)
  slabs = sorted({int(bidx[g[0], 0]) for g in groups})

  def read(bz):
    z0 = bz * span[0]
    return volume.store[z0 : min(z0 + shape_in[0], volume.shape[0])].read()

  results = []
  gi = 0
  for bz, slab in read_ahead(slabs, read):
    while gi < len(groups) and bidx[groups[gi][0], 0] == bz:
      g = groups[gi]
      by, bx = int(bidx[g[0], 1]), int(bidx[g[0], 2])
      y0, x0 = by * span[1], bx * span[2]
      box = slab[:, y0 : y0 + shape_in[1], x0 : x0 + shape_in[2]]
      x = np.zeros(shape_in, np.float32)
      x[: box.shape[0], : box.shape[1], : box.shape[2]] = box
      out = _block_features(block, variables, x, mean32, std32)
      results.append((g, out))
      gi += 1
    # Bound the in-flight device results: collect all but the newest.
    while len(results) > 1:
      g, out = results.pop(0)
      feats[g] = np.asarray(out)[local_flat[g]]
  for g, out in results:
    feats[g] = np.asarray(out)[local_flat[g]]


def flops_per_grid_patch(
  model_cfg: ml_collections.ConfigDict,
  patch_size: int,
  stride: int,
  shape: tuple[int, int, int],
  memory_mb: float = _DEFAULT_MEMORY_MB,
) -> dict[str, float]:
  """Forward FLOPs per grid patch of the per-patch path and of the dense path on a volume.

  The dense figure is the FLOPs of every block that tiles the full stride grid of `shape` (what
  `dense_grid_features` runs when every grid point is a centre), divided by the number of grid
  points; with a sparse foreground the skipped empty blocks make it cheaper still.

  Args:
    model_cfg: `config.model`.
    patch_size: odd patch edge w.
    stride: grid step s.
    shape: volume shape.
    memory_mb: the dense block budget (as passed to dense_grid_features).

  Returns:
    {'per_patch': FLOPs, 'dense': FLOPs, 'grid_patches': number of grid points, 'block': the dense
    block's lattice points per axis}.
  """
  n = model.net_spec_of_config(model_cfg, patch_size)
  cells = grid.shape_of(shape, patch_size, stride)
  total = math.prod(cells)
  per_patch = float(model.flops_per_patch(model_cfg, patch_size))
  if total == 0:
    return {'per_patch': per_patch, 'dense': per_patch, 'grid_patches': 0, 'block': (0, 0, 0)}
  block = _plan(n, stride, cells, memory_mb, None)
  blocks = math.prod(-(-g // t) for g, t in zip(cells, block.t, strict=True))
  dense = blocks * _block_cost(block)[0] / total
  return {'per_patch': per_patch, 'dense': dense, 'grid_patches': total, 'block': block.t}


def choose_path(
  model_cfg: ml_collections.ConfigDict,
  patch_size: int,
  stride: int,
  shape: tuple[int, int, int],
  num_centres: int | None = None,
) -> str:
  """'dense' when it needs fewer forward FLOPs than embedding the grid patches one by one.

  Args:
    model_cfg: `config.model`.
    patch_size: odd patch edge w.
    stride: grid step s.
    shape: volume shape.
    num_centres: grid patches actually requested (foreground); None means the whole grid. The
      dense cost is counted for the whole grid (an upper bound: empty blocks are skipped).

  Returns:
    'dense' or 'per_patch'.
  """
  f = flops_per_grid_patch(model_cfg, patch_size, stride, shape)
  m = f['grid_patches'] if num_centres is None else num_centres
  return 'dense' if f['dense'] * f['grid_patches'] < f['per_patch'] * m else 'per_patch'
