"""Dense grid features: equal to the per-patch path for any stride, slab and block layout."""

import jax
import numpy as np
import pytest
from helpers import memory_volume

from configs import base, demo
from jule3d import dense, features, grid, model, patches, sharding
from jule3d.errors import UserError

MEAN, STD = 100.0, 20.0
# 15 -> conv 13 -> pool 6 -> 4 -> 2: fc1 sees a 2^3 window, so its flatten order is exercised.
W = 15


_volume = memory_volume


def _model(patch_size, kernel, feats, hidden, embed, seed=0, **fields):
  cfg = base.get_config().model
  cfg.update(fields)
  cfg.conv_features = feats
  cfg.kernel_size = kernel
  cfg.hidden_dim = hidden
  cfg.embed_dim = embed
  cfg.init_std = 0.2
  net = model.build_model(cfg)
  variables = jax.tree.map(np.asarray, model.init_variables(net, jax.random.key(seed), patch_size))
  # Non-trivial running statistics, so eval-mode BatchNorm is not the identity.
  rng = np.random.default_rng(seed)
  for stats in variables['batch_stats'].values():
    stats['mean'] = rng.normal(0.0, 0.3, stats['mean'].shape).astype(np.float32)
    stats['var'] = rng.uniform(0.2, 2.0, stats['var'].shape).astype(np.float32)
  return cfg, net, variables


@pytest.fixture(scope='module')
def tiny():
  return _model(W, 3, (4, 5, 6), 7, 5)


def _grid(shape, w, s):
  axes = grid.axes(shape, w, s)
  return np.stack(np.meshgrid(*axes, indexing='ij'), -1).reshape(-1, 3).astype(np.int32)


def _per_patch(vol, centres, w, net, variables):
  fn = model.make_embed_fn(net)
  return features.grid_features(vol, centres, w, fn, variables, MEAN, STD, batch_size=64)


def _random(shape, seed=1):
  return np.random.default_rng(seed).normal(MEAN, STD, shape).astype(np.float32)


@pytest.mark.parametrize(
  'shape, stride, kwargs',
  [
    ((22, 19, 24), 1, {}),
    ((22, 19, 24), 2, {'slab_planes': 2}),
    ((23, 20, 21), 3, {'slab_planes': 1}),
    ((27, 26, 25), 5, {}),
    ((21, 24, 22), 2, {'memory_mb': 0.01}),  # 1-lattice-point blocks: tiling on every axis
    ((25, 20, 19), 3, {'memory_mb': 0.3}),
  ],
)
def test_dense_equals_per_patch(tiny, shape, stride, kwargs):
  _, net, variables = tiny
  w = W
  vol = _volume(_random(shape))
  centres = _grid(shape, w, stride)
  # The first and last valid centres touch the volume border on every axis for stride 1.
  got = dense.dense_grid_features(
    vol, centres, w, net, variables, MEAN, STD, stride=stride, **kwargs
  )
  want = _per_patch(vol, centres, w, net, variables)
  assert got.shape == want.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
  # The comparison means something only if the features vary over the volume.
  assert got.std(axis=0).max() > 0.05


@pytest.mark.parametrize(
  'fields', [{'head': 'mean'}, {'centre_size': 3}, {'head': 'mean', 'centre_size': 5}]
)
@pytest.mark.parametrize('shape, stride', [((22, 19, 24), 1), ((23, 20, 21), 3)])
def test_dense_equals_per_patch_for_each_head(fields, shape, stride):
  _, net, variables = _model(W, 3, (4, 5, 6), 7, 5, **fields)
  vol = _volume(_random(shape))
  centres = _grid(shape, W, stride)
  got = dense.dense_grid_features(vol, centres, W, net, variables, MEAN, STD, stride=stride)
  want = _per_patch(vol, centres, W, net, variables)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
  assert got.std(axis=0).max() > 0.05


@pytest.mark.parametrize('fields', [{}, {'head': 'mean', 'centre_size': 1}])
def test_dense_equals_per_patch_for_the_hidden_layer(fields):
  # config.segment.layer = 'hidden': both paths return the first dense layer's ReLU output.
  _, net, variables = _model(W, 3, (4, 5, 6), 7, 5, **fields)
  hidden = net.clone(output='hidden')
  shape = (22, 19, 24)
  vol = _volume(_random(shape))
  centres = _grid(shape, W, 2)
  got = dense.dense_grid_features(vol, centres, W, hidden, variables, MEAN, STD, stride=2)
  want = _per_patch(vol, centres, W, hidden, variables)
  assert got.shape == (len(centres), 7) and got.min() >= 0
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
  # Unnormalised (about 0.02 here, not unit rows): it must still vary 100x the tolerance.
  assert got.std(axis=0).max() > 0.01
  embedding = dense.dense_grid_features(vol, centres, W, net, variables, MEAN, STD, stride=2)
  assert embedding.shape == (len(centres), 5)


def test_border_centres_and_sparse_foreground(tiny):
  _, net, variables = tiny
  w, shape = W, (24, 21, 26)
  vol = _volume(_random(shape, seed=3))
  lo, hi = patches.centre_bounds(shape, w)
  grid = _grid(shape, w, 1)
  keep = np.random.default_rng(0).random(len(grid)) < 0.05
  # Corners of the valid-centre box (first and last valid centre on each axis) plus a sparse,
  # scattered foreground: empty blocks are skipped, the stride is inferred.
  corners = np.array(np.meshgrid(*[[a, b - 1] for a, b in zip(lo, hi, strict=True)], indexing='ij'))
  centres = np.unique(np.concatenate([grid[keep], corners.reshape(3, -1).T]), axis=0)
  got = dense.dense_grid_features(vol, centres, w, net, variables, MEAN, STD, slab_planes=3)
  np.testing.assert_allclose(got, _per_patch(vol, centres, w, net, variables), rtol=0, atol=1e-4)


def test_demo_model_and_integer_volume():
  cfg = demo.get_config()
  w = cfg.patches.patch_size
  net = model.build_model(cfg.model)
  variables = jax.tree.map(np.asarray, model.init_variables(net, jax.random.key(1), w))
  rng = np.random.default_rng(2)
  for stats in variables['batch_stats'].values():
    stats['mean'] = rng.normal(0.0, 0.5, stats['mean'].shape).astype(np.float32)
    stats['var'] = rng.uniform(0.5, 2.0, stats['var'].shape).astype(np.float32)
  arr = rng.integers(0, 200, (30, 28, 33)).astype(np.int16)
  vol = _volume(arr)
  centres = _grid(arr.shape, w, 3)
  got = dense.dense_grid_features(vol, centres, w, net, variables, MEAN, STD, slab_planes=2)
  np.testing.assert_allclose(got, _per_patch(vol, centres, w, net, variables), rtol=0, atol=1e-4)


def test_inconsistent_calls_are_a_bug_not_bad_input(tiny):
  # The pipeline builds the centres and passes the stored std: a mismatch is a programming error,
  # an ordinary ValueError (a traceback), never the one-line UserError of bad input.
  _, net, variables = tiny
  vol = _volume(_random((20, 20, 20)))
  args = (W, net, variables, MEAN, STD)
  with pytest.raises(ValueError, match='outside the volume'):
    dense.dense_grid_features(vol, np.array([[7, 7, 13]]), *args)
  with pytest.raises(ValueError, match=r'\[M, 3\]'):
    dense.dense_grid_features(vol, np.array([7, 7, 7]), *args)
  with pytest.raises(ValueError, match='stride-2 grid'):
    dense.dense_grid_features(vol, np.array([[7, 7, 8]]), *args, stride=2)
  with pytest.raises(ValueError, match='std') as info:
    dense.dense_grid_features(vol, np.array([[7, 7, 7]]), W, net, variables, MEAN, 0.0)
  assert not isinstance(info.value, UserError)
  assert dense.dense_grid_features(vol, np.zeros((0, 3), int), *args).shape == (0, 5)


def test_flops_and_choice():
  cfg = demo.get_config().model
  w = 17
  small = dense.flops_per_grid_patch(cfg, w, 1, (64, 64, 64))
  large = dense.flops_per_grid_patch(cfg, w, 4, (64, 64, 64))
  assert small['per_patch'] == model.flops_per_patch(cfg, w) == large['per_patch']
  assert small['grid_patches'] == 48**3 and large['grid_patches'] == 12**3
  # Dense shares the convolutions between overlapping patches: far cheaper at small strides, and
  # its cost per patch grows with the stride.
  assert small['dense'] < large['dense'] < small['per_patch']
  assert dense.choose_path(cfg, w, 1, (64, 64, 64)) == 'dense'
  # Patches far apart share nothing: the dense path computes convolutions between them for nothing.
  assert dense.choose_path(cfg, w, 40, (200, 200, 200)) == 'per_patch'
  # Few requested centres on a large grid: per patch wins.
  assert dense.choose_path(cfg, w, 2, (96, 96, 96), num_centres=10) == 'per_patch'


def test_feature_parts_in_whole_blocks_reproduce_the_unsplit_features_bit_for_bit(tiny, tmp_path):
  _, net, variables = tiny
  arr = _random((70, 22, 24))
  vol, s = _volume(arr), 2
  centres = _grid(arr.shape, W, s)
  kw = dict(stride=s, memory_mb=0.05)  # a small budget: several blocks along axis 0
  blocks = dense.block_planes(net, W, s, arr.shape, memory_mb=0.05)
  grid_planes = len(np.unique(centres[:, 0]))
  assert 1 <= blocks < grid_planes // 2, (blocks, grid_planes)
  whole = dense.dense_grid_features(vol, centres, W, net, variables, MEAN, STD, **kw)
  calls = []

  def compute(part):
    calls.append(len(part))
    return dense.dense_grid_features(vol, part, W, net, variables, MEAN, STD, **kw)

  got = features.resumable_features(
    compute, centres, str(tmp_path), 'k', planes_per_part=blocks, patch_size=W, stride=s
  )
  assert len(calls) == -(-grid_planes // blocks)
  np.testing.assert_array_equal(got, whole)


def _counting(fn):
  """fn, and the batch size of each of its calls."""
  calls = []

  def counted(v, x):
    calls.append(x.shape[0])
    return fn(v, x)

  return counted, calls


def test_per_patch_batches_span_grid_planes(tiny):
  # A grid plane of this volume holds 5 x 6 = 30 patches, a batch 64: batches must be filled across
  # planes (ceil(M / 64) calls, not one padded call per plane), each centre keeping its own features.
  _, net, variables = tiny
  vol = _volume(_random((40, 23, 25)))
  centres = _grid(vol.shape, W, 2)
  fn = model.make_embed_fn(net)
  counted, calls = _counting(fn)
  got = features.grid_features(vol, centres, W, counted, variables, MEAN, STD, 64, slab_depth=2)
  assert len(centres) == 13 * 5 * 6 and calls == [64] * -(-len(centres) // 64)
  raw = patches.read_patches(vol, centres, W)
  want = np.concatenate(
    [np.asarray(fn(variables, (raw[i : i + 64] - MEAN) / STD)) for i in range(0, len(raw), 64)]
  )
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_training_and_grid_features_share_one_batch_loop(tiny):
  # extract_features (normalised patches on the device, as training holds them) and grid_features
  # (streamed from the volume) run the same padded batch loop: the same patches give the same
  # features bit for bit, and every CNN call sees exactly one full batch.
  _, net, variables = tiny
  vol = _volume(_random((30, 21, 22)))
  centres = _grid(vol.shape, W, 3)
  counted, calls = _counting(model.make_embed_fn(net))
  streamed = features.grid_features(vol, centres, W, counted, variables, MEAN, STD, 40)
  on_device = jax.numpy.asarray(patches.normalise(patches.read_patches(vol, centres, W), MEAN, STD))
  trained = features.extract_features(counted, variables, on_device, 40)
  assert len(centres) % 40 and set(calls) == {40}
  assert len(calls) == 2 * -(-len(centres) // 40)
  np.testing.assert_array_equal(streamed, trained)


def test_embed_batches_pads_short_batches_and_keeps_each_row():
  # Rows land at their indices, whatever order the batches come in; a short batch is padded to the
  # batch size and the padding's outputs are dropped.
  x = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
  seen = []

  def fn(_, b):
    seen.append(np.asarray(b)[:, 0].tolist())
    return b * 2.0

  idx = [np.array([7, 2, 9, 0]), np.array([5, 1])]
  got = features.embed_batches(
    fn, None, ((i, x[i].__getitem__) for i in idx), 10, 4, sharding.mesh()
  )
  assert seen == [[7, 2, 9, 0], [5, 1, 1, 1]]
  rows = np.concatenate(idx)
  np.testing.assert_array_equal(got[rows], x[rows] * 2.0)
