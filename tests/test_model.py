"""Tests for jule3d.model: method §2 geometry, init, conv formulations, bf16, masked BatchNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from jule3d import convolution
from jule3d import model as model_lib


def small_cfg(patch: int = 13, kernel: int = 3, conv_impl: str = 'xla', dtype: str = 'float32'):
  cfg = base.get_config().model
  cfg.conv_features = (4, 5, 6)
  cfg.kernel_size = kernel
  cfg.hidden_dim = 16
  cfg.embed_dim = 8
  cfg.init_std = 0.2  # Keeps pre-normalisation outputs O(1) in a network this narrow.
  cfg.conv_impl = conv_impl
  cfg.dtype = dtype
  return cfg


def patches(n: int, w: int, seed: int = 0) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal((n, w, w, w)), jnp.float32)


def test_paper_model_geometry_params_and_flops():
  cfg = base.get_config().model
  shapes = dict(model_lib.layer_shapes(cfg, 27))
  assert shapes == {
    'input': (1, 27, 27, 27),
    'conv1': (1, 23, 23, 23, 50),
    'pool1': (1, 11, 11, 11, 50),
    'conv2': (1, 7, 7, 7, 50),
    'conv3': (1, 3, 3, 3, 50),
    'flatten': (1, 1350),
    'fc1': (1, 1350),
    'fc2': (1, 160),
    'embedding': (1, 160),
  }
  model = model_lib.build_model(cfg)
  variables = jax.eval_shape(lambda: model_lib.init_variables(model, jax.random.key(0), 27))
  params = variables['params']
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == 2_671_710
  assert params['conv2']['kernel'].shape == (5, 5, 5, 50, 50)
  assert set(variables['batch_stats']) == {'bn1', 'bn2', 'bn3'}
  # FLOPs re-derived from the traced shapes: 2 x output elements x fan-in of each layer.
  expected = 0
  for name in ('conv1', 'conv2', 'conv3', 'fc1', 'fc2'):
    kernel = params[name]['kernel'].shape
    out_elems = int(np.prod(shapes[name][1:]))
    expected += 2 * out_elems * int(np.prod(kernel[:-1]))
  assert model_lib.flops_per_patch(cfg, 27) == expected
  assert abs(expected / 1e6 - 387.4) < 0.5  # method §2: 387.4 MFLOP per paper patch.


def test_init_statistics():
  cfg = base.get_config().model
  cfg.conv_features = (16, 16, 16)
  cfg.hidden_dim = 256
  cfg.embed_dim = 64
  model = model_lib.build_model(cfg)
  v = model_lib.init_variables(model, jax.random.key(1), 27)
  for name in ('conv2', 'conv3', 'fc1'):
    w = np.asarray(v['params'][name]['kernel'])
    assert w.size >= 30_000
    assert abs(w.std() - 0.01) < 5e-4, name
    assert abs(w.mean()) < 5e-4, name
    assert not np.any(np.asarray(v['params'][name]['bias']))
  scales = np.concatenate([np.asarray(v['params'][f'bn{i}']['scale']) for i in (1, 2, 3)])
  assert scales.min() >= 0 and scales.max() < 1
  assert 0.3 < scales.mean() < 0.7 and scales.std() > 0.15  # U(0, 1): mean 0.5, std 0.29.
  for i in (1, 2, 3):
    assert not np.any(np.asarray(v['params'][f'bn{i}']['bias']))
    np.testing.assert_array_equal(v['batch_stats'][f'bn{i}']['mean'], 0.0)
    np.testing.assert_array_equal(v['batch_stats'][f'bn{i}']['var'], 1.0)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(v))
  # Same tree, shapes and dtypes as the module's own init (init_variables draws them faster).
  x = jax.ShapeDtypeStruct((1, 27, 27, 27), jnp.float32)
  ref = jax.eval_shape(lambda x: model.init(jax.random.key(1), x, train=False), x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), ref) == jax.tree.map(
    lambda a: (a.shape, a.dtype), v
  )


def test_output_rows_unit_norm_train_and_eval():
  cfg = small_cfg()
  model = model_lib.build_model(cfg)
  v = model_lib.init_variables(model, jax.random.key(0), 13)
  x = patches(6, 13)
  emb_eval = model_lib.embed(model, v, x)
  emb_train, _ = model.apply(v, x, train=True, mutable=['batch_stats'])
  for emb in (emb_eval, emb_train):
    assert emb.shape == (6, 8) and emb.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=1), 1.0, atol=1e-5)
  # Train (batch stats) and eval (running stats 0/1) modes must really differ.
  assert np.max(np.abs(np.asarray(emb_eval - emb_train))) > 1e-3
  # A trailing channel axis is accepted; make_embed_fn binds the model.
  np.testing.assert_array_equal(
    model_lib.make_embed_fn(model)(v, x[..., None]), np.asarray(emb_eval)
  )


def test_l2_normalize_zero_row_is_finite():
  x = jnp.array([[0.0, 0.0], [3.0, 4.0]])
  np.testing.assert_allclose(model_lib.l2_normalize(x), [[0, 0], [0.6, 0.8]], atol=1e-7)
  g = jax.grad(lambda x: jnp.sum(model_lib.l2_normalize(x) * jnp.array([1.0, 2.0])))(x)
  assert np.all(np.isfinite(np.asarray(g)))


def test_im2col_matches_xla_forward_and_gradients():
  # The paper's 5^3 kernels on a 23^3 patch (19 -> 9 -> 5 -> 1); 3^3 kernels and non-cubic inputs
  # are covered at the layer level below.
  patch, kernel = 23, 5
  xla_model = model_lib.build_model(small_cfg(patch, kernel, 'xla'))
  col_model = model_lib.build_model(small_cfg(patch, kernel, 'im2col'))
  # One parameter tree for both formulations (checkpoints are interchangeable).
  v = model_lib.init_variables(xla_model, jax.random.key(2), patch)
  v_col = model_lib.init_variables(col_model, jax.random.key(2), patch)
  assert jax.tree.structure(v) == jax.tree.structure(v_col)
  x = patches(5, patch, seed=3)
  probe = jnp.asarray(np.random.default_rng(4).standard_normal((5, 8)), jnp.float32)

  def outputs(model):
    def loss(params):
      emb, upd = model.apply(
        {'params': params, 'batch_stats': v['batch_stats']}, x, train=True, mutable=['batch_stats']
      )
      return jnp.sum(emb * probe), (emb, upd['batch_stats'])

    (_, (emb, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(v['params'])
    return emb, stats, grads, model_lib.embed(model, v, x)

  ref, got = outputs(xla_model), outputs(col_model)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
    # 1e-4 relative to each array's scale: gradients reach ~100 here (the L2 normalisation of a
    # small pre-normalised output amplifies them), where float32 rounding alone is ~1e-5.
    a, b = np.asarray(a), np.asarray(b)
    assert np.max(np.abs(a - b)) <= 1e-4 * max(1.0, np.max(np.abs(a)))
  # The comparison is not vacuous: gradients reach the first conv.
  assert np.max(np.abs(np.asarray(ref[2]['conv1']['kernel']))) > 1e-3


def test_im2col_conv_non_cubic_and_input_gradient():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 8, 9, 10, 3)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 3, 3, 4)), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((2, 6, 7, 8, 4)), jnp.float32)
  np.testing.assert_allclose(
    convolution.im2col_conv3d(x, k), convolution.xla_conv3d(x, k), atol=1e-4, rtol=1e-5
  )
  grads = [
    jax.grad(lambda x, k, f=f: jnp.sum(f(x, k) * dy), argnums=(0, 1))(x, k)
    for f in (convolution.xla_conv3d, convolution.im2col_conv3d)
  ]
  for a, b in zip(*grads, strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4, rtol=1e-5)


def test_bfloat16_close_to_float32():
  f32 = model_lib.build_model(small_cfg(23, 5, 'im2col'))
  bf16 = model_lib.build_model(small_cfg(23, 5, 'im2col', 'bfloat16'))
  v = model_lib.init_variables(f32, jax.random.key(6), 23)
  x = patches(4, 23, seed=7)
  a = np.asarray(model_lib.embed(f32, v, x))
  b = model_lib.embed(bf16, v, x)
  assert b.dtype == jnp.float32
  diff = np.max(np.abs(np.asarray(b) - a))
  # bf16 has an 8-bit mantissa (~4e-3 relative per rounding): close, but not bit-identical.
  assert 0 < diff < 5e-2
  assert np.min(np.sum(a * np.asarray(b), axis=1)) > 0.998  # cosine similarity of unit rows.
  xla_bf16 = model_lib.build_model(small_cfg(23, 5, 'xla', 'bfloat16'))
  assert np.max(np.abs(np.asarray(model_lib.embed(xla_bf16, v, x)) - a)) < 5e-2


def test_batchnorm_mask_ignores_padding():
  model = model_lib.build_model(small_cfg())
  v = model_lib.init_variables(model, jax.random.key(8), 13)
  x = patches(6, 13, seed=9)
  padded = jnp.concatenate([x, 100.0 * patches(3, 13, seed=10)])
  mask = jnp.array([True] * 6 + [False] * 3)
  emb, upd = model.apply(v, x, train=True, mutable=['batch_stats'])
  emb_pad, upd_pad = model.apply(v, padded, train=True, mask=mask, mutable=['batch_stats'])
  np.testing.assert_allclose(np.asarray(emb_pad[:6]), np.asarray(emb), atol=1e-5)
  for a, b in zip(jax.tree.leaves(upd), jax.tree.leaves(upd_pad), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
  # Without the mask the padding does change the statistics.
  emb_nomask, _ = model.apply(v, padded, train=True, mutable=['batch_stats'])
  assert np.max(np.abs(np.asarray(emb_nomask[:6] - emb))) > 1e-2


def test_auto_impl_follows_backend():
  from jule3d import onednn

  cpu = 'onednn' if onednn.available() else 'im2col'
  expected = cpu if jax.default_backend() == 'cpu' else 'xla'
  assert convolution.resolve_conv_impl('auto') == expected
  assert convolution.resolve_conv_impl('auto', 'bfloat16') in ('im2col', 'xla')
  assert convolution.resolve_conv_impl('xla') == 'xla'
  with pytest.raises(ValueError, match='conv_impl'):
    convolution.resolve_conv_impl('cudnn')


@pytest.mark.parametrize(
  'head, centre, flat', [('mean', 0, 6), ('mean', 1, 7), ('flatten', 3, 6 * 8 + 27)]
)
def test_head_and_centre_path_geometry_and_flops(head, centre, flat):
  # 13 -> conv 11 -> pool 5 -> 3 -> 1 with kernel 3 (last map 1^3); use 15 for a 2^3 map.
  cfg = small_cfg(patch=15)
  cfg.head, cfg.centre_size = head, centre
  shapes = dict(model_lib.layer_shapes(cfg, 15))
  assert shapes['conv3'] == (1, 2, 2, 2, 6) and shapes['flatten'] == (1, flat)
  model = model_lib.build_model(cfg)
  params = jax.eval_shape(lambda: model_lib.init_variables(model, jax.random.key(0), 15))['params']
  assert params['fc1']['kernel'].shape == (flat, 16)
  expected = 0
  for name in ('conv1', 'conv2', 'conv3', 'fc1', 'fc2'):
    kernel = params[name]['kernel'].shape
    expected += 2 * int(np.prod(shapes[name][1:])) * int(np.prod(kernel[:-1]))
  assert model_lib.flops_per_patch(cfg, 15) == expected


def test_mean_head_averages_the_last_map_and_centre_path_reads_the_centre():
  cfg = small_cfg(patch=15)
  flat_net = model_lib.build_model(cfg)
  cfg.head = 'mean'
  net = model_lib.build_model(cfg)
  variables = model_lib.init_variables(net, jax.random.key(1), 15)
  flat_vars = model_lib.init_variables(flat_net, jax.random.key(1), 15)
  x = patches(3, 15, seed=3)

  def fc1_input(n, v):
    _, state = n.apply(v, x, train=False, capture_intermediates=True, mutable=['intermediates'])
    return np.asarray(state['intermediates']['flatten'][0])

  # The same convolutions (same draws: the conv kernels come first); 'mean' averages their last map
  # per channel, which 'flatten' passes position by position (channels last).
  for name in ('conv1', 'conv2', 'conv3'):
    np.testing.assert_array_equal(
      variables['params'][name]['kernel'], flat_vars['params'][name]['kernel']
    )
  per_position = fc1_input(flat_net, flat_vars).reshape(3, 8, 6)
  np.testing.assert_allclose(
    fc1_input(net, variables), per_position.mean(axis=1), rtol=1e-5, atol=1e-6
  )
  # The centre path: the central voxel itself reaches the dense layers, beside the map.
  cfg.centre_size = 1
  c_net = model_lib.build_model(cfg)
  c_vars = model_lib.init_variables(c_net, jax.random.key(1), 15)
  got = fc1_input(c_net, c_vars)
  np.testing.assert_array_equal(got[:, -1], np.asarray(x[:, 7, 7, 7]))
  bumped = x.at[:, 7, 7, 7].add(5.0)
  with_path = float(
    jnp.abs(c_net.apply(c_vars, bumped, train=False) - c_net.apply(c_vars, x, train=False)).max()
  )
  without = float(
    jnp.abs(net.apply(variables, bumped, train=False) - net.apply(variables, x, train=False)).max()
  )
  assert with_path > without


def test_hidden_output_is_what_the_output_layer_reads():
  cfg = small_cfg(patch=15)
  cfg.head, cfg.centre_size = 'mean', 1
  net = model_lib.build_model(cfg)
  variables = model_lib.init_variables(net, jax.random.key(2), 15)
  x = patches(4, 15, seed=5)
  hidden = np.asarray(net.clone(output='hidden').apply(variables, x, train=False))
  assert hidden.shape == (4, cfg.hidden_dim) and hidden.min() >= 0 and hidden.max() > 0
  fc2 = variables['params']['fc2']
  again = model_lib.l2_normalize(jnp.asarray(hidden) @ fc2['kernel'] + fc2['bias'])
  np.testing.assert_allclose(again, net.apply(variables, x, train=False), rtol=1e-5, atol=1e-6)
