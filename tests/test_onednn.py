"""The oneDNN convolution (jule3d/onednn.py) against the im2col path: values and both gradients."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT

from configs import smoke
from jule3d import convolution, onednn
from jule3d import model as model_lib

pytestmark = pytest.mark.skipif(
  not onednn.available(), reason='oneDNN extension not built (make venv builds it)'
)


def _close(a, b):
  """Within 1e-4 of the reference's scale (float32 sums in another order)."""
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape
  assert np.max(np.abs(a - b)) <= 1e-4 * max(1.0, float(np.max(np.abs(b))))


@pytest.mark.parametrize(
  'x_shape,k,f',
  [
    ((1, 9, 9, 9, 1), 3, 4),  # batch 1, odd edges, one input channel (conv1)
    ((3, 8, 10, 7, 5), 3, 6),  # even and odd edges, non-cubic
    ((2, 12, 12, 12, 4), 5, 3),  # the paper's kernel edge
  ],
)
def test_forward_and_gradients_equal_im2col(x_shape, k, f):
  rng = np.random.default_rng(sum(x_shape) + k)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((k, k, k, x_shape[-1], f)), jnp.float32)
  out_shape = (x_shape[0], *[n - k + 1 for n in x_shape[1:4]], f)
  dy = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)
  results = []
  for conv in (onednn.conv3d, convolution.im2col_conv3d):
    y = jax.jit(conv)(x, kernel)
    grads = jax.jit(jax.grad(lambda x, w, c=conv: jnp.sum(c(x, w) * dy), argnums=(0, 1)))(x, kernel)
    results.append((y, *grads))
  for a, b in zip(*results, strict=True):
    _close(a, b)
  assert np.max(np.abs(np.asarray(results[0][2]))) > 1e-2  # not vacuous


def test_same_result_run_to_run():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((4, 11, 11, 11, 3)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 3, 8)), jnp.float32)
  g = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(onednn.conv3d(x, w))), argnums=(0, 1)))
  first, second = g(x, kernel), g(x, kernel)
  for a, b in zip(first, second, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_model_gradients_match_im2col():
  """The whole CNN (BN, pool, dense layers) trains the same way through either convolution."""
  outs = []
  for impl in ('onednn', 'im2col'):
    c = smoke.get_config()
    c.model.conv_impl = impl
    net = model_lib.build_model(c.model)
    v = model_lib.init_variables(net, jax.random.key(0), c.patches.patch_size)
    x = jax.random.normal(jax.random.key(1), (6, *(c.patches.patch_size,) * 3))

    def loss(p, v=v, net=net, x=x):
      e, _ = net.apply({**v, 'params': p}, x, train=True, mutable=['batch_stats'])
      return jnp.sum(e[:, 0] * jnp.arange(6.0))

    outs.append(jax.jit(jax.value_and_grad(loss))(v['params']))
  _close(outs[0][0], outs[1][0])
  for a, b in zip(jax.tree.leaves(outs[0][1]), jax.tree.leaves(outs[1][1]), strict=True):
    _close(a, b)


def test_sharded_batch_on_four_devices():
  code = (
    'import jax, jax.numpy as jnp, numpy as np\n'
    'from jule3d import convolution, onednn, sharding\n'
    'm = sharding.mesh()\n'
    'rng = np.random.default_rng(0)\n'
    'x = sharding.put_batch(rng.standard_normal((8, 9, 9, 9, 2)).astype(np.float32), m)\n'
    'w = jnp.asarray(rng.standard_normal((3, 3, 3, 2, 4)), jnp.float32)\n'
    'f = lambda c: jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(c(x, w))), (0, 1)))\n'
    'a, b = f(onednn.conv3d)(x, w), f(convolution.im2col_conv3d)(x, w)\n'
    'err = max(float(jnp.max(jnp.abs(p - q)) / max(1.0, float(jnp.max(jnp.abs(q)))))\n'
    '          for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b)))\n'
    'print(jax.device_count(), len(x.sharding.device_set), err)\n'
  )
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  out = subprocess.run(
    [sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
  ).stdout.split()
  assert out[:2] == ['4', '4']
  assert float(out[2]) < 1e-4


def test_failed_build_falls_back_to_im2col(tmp_path):
  code = 'from jule3d import onednn, convolution\nprint(onednn.available(), convolution.resolve_conv_impl("auto"))\n'
  env = dict(os.environ, JULE3D_BUILD_DIR=str(tmp_path / 'build'), CXX='false')
  proc = subprocess.run(
    [sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
  )
  assert proc.stdout.split() == ['False', 'im2col']
  warnings = [ln for ln in proc.stderr.splitlines() if 'oneDNN convolution unavailable' in ln]
  assert len(warnings) == 1 and 'failed' in warnings[0], proc.stderr
