"""3D convolutions of the CNN (method §2): the formulations and the choice among them.

Formulations of the 3D convolution share one parameter tree (`kernel` [k,k,k,in,out] and `bias`,
the `flax.linen.Conv` layout), so a checkpoint trained with one runs with the other:
  'xla'     `lax.conv_general_dilated`: cuDNN on GPU, the native convolution on TPU.
  'im2col'  gather every k^3 window into a column matrix, then one matmul. XLA's CPU conv3d ran at
            14-17 GFLOP/s and its matmul at 269 (BENCHMARKS.md, "CNN throughput"); the gather
            costs memory (~0.6 GB per 100 paper patches for conv1) but wins on CPU.
  'onednn'  oneDNN's direct convolution, forward and both gradients, through XLA's FFI
            (jule3d/onednn.py): float32 on the CPU, no materialised columns.
  'auto'    on the CPU backend oneDNN where the extension is built and the dtype is float32, else
            im2col; xla on GPU/TPU (decided at trace time).
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_CONV_DIMS = ('NDHWC', 'DHWIO', 'NDHWC')


def resolve_conv_impl(conv_impl: str, dtype: str = 'float32') -> str:
  """The convolution formulation actually used for a config value.

  Args:
    conv_impl: 'auto', 'xla', 'im2col' or 'onednn'.
    dtype: the model's compute dtype ('float32' or 'bfloat16').

  Returns:
    'xla', 'im2col' or 'onednn' ('auto': see the module docstring).

  Raises:
    ValueError: an unknown value, or 'onednn' where it cannot run (not built, bfloat16, no CPU).
  """
  from jule3d import onednn

  if conv_impl == 'auto':
    if jax.default_backend() != 'cpu':
      return 'xla'
    return 'onednn' if dtype == 'float32' and onednn.available() else 'im2col'
  if conv_impl not in ('xla', 'im2col', 'onednn'):
    raise ValueError(f"conv_impl must be 'auto', 'xla', 'im2col' or 'onednn', got {conv_impl!r}")
  if conv_impl == 'onednn' and (dtype != 'float32' or not onednn.available()):
    raise ValueError(
      "conv_impl 'onednn' needs dtype float32 and the built extension (jule3d/onednn.py); "
      "use 'auto' to fall back to im2col"
    )
  return conv_impl


def conv3d_fn(impl: str) -> Callable[..., jax.Array]:
  """The convolution of a resolved impl: (x, kernel, compute_dtype) -> VALID stride-1 output."""
  if impl == 'onednn':
    from jule3d import onednn

    return onednn.conv3d
  return im2col_conv3d if impl == 'im2col' else xla_conv3d


def _window_index(shape: tuple[int, int, int], kernel: int) -> np.ndarray:
  """Flat voxel index of every (output voxel, kernel offset) pair of a VALID 3D conv on `shape`.

  Row-major over (od, oh, ow, kd, kh, kw), so gathered columns match kernel.reshape(k^3 * C, out).
  """
  k = np.arange(kernel)
  d, h, w = (np.arange(n - kernel + 1)[:, None] + k[None, :] for n in shape)
  d = d[:, None, None, :, None, None]
  h = h[None, :, None, None, :, None]
  w = w[None, None, :, None, None, :]
  return ((d * shape[1] + h) * shape[2] + w).reshape(-1).astype(np.int32)


def _columns(x: jax.Array, kernel_size: int) -> jax.Array:
  """[B, D, H, W, C] -> [B * outD * outH * outW, k^3 * C] window columns (one gather)."""
  b, *spatial, c = x.shape
  out = np.prod([n - kernel_size + 1 for n in spatial])
  cols = x.reshape(b, -1, c)[:, _window_index(tuple(spatial), kernel_size), :]
  return cols.reshape(b * out, kernel_size**3 * c)


def _col2im(dcols: jax.Array) -> jax.Array:
  """Adjoint of `_columns`: [B, o, o, o, k, k, k, C] column gradients -> [B, D, H, W, C].

  Two in-place overlap-add stages: the k^2 (kh, kw) offsets into H and W, then the k kd offsets
  into D. Measured on CPU (paper conv2, batch 100): as fast as k^3 slice additions (~0.3 s) and
  ~2x faster than the scatter-add that autodiff derives from the gather, while compiling ~2.5x
  faster than k^3 additions; variants with pads (XLA materialises every pad) ran 3-5x slower.
  """
  b, o1, o2, o3, k, _, _, c = dcols.shape
  partial = jnp.zeros((b, o1, o2 + k - 1, o3 + k - 1, k, c), dcols.dtype)
  for kh, kw in np.ndindex(k, k):
    partial = partial.at[:, :, kh : kh + o2, kw : kw + o3].add(dcols[:, :, :, :, :, kh, kw, :])
  dx = jnp.zeros((b, o1 + k - 1, o2 + k - 1, o3 + k - 1, c), dcols.dtype)
  for kd in range(k):
    dx = dx.at[:, kd : kd + o1].add(partial[:, :, :, :, kd])
  return dx


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _im2col_conv(x: jax.Array, kernel: jax.Array, compute_dtype: Any) -> jax.Array:
  return _im2col_conv_fwd(x, kernel, compute_dtype)[0]


def _im2col_conv_fwd(x, kernel, compute_dtype):
  b, *spatial, _ = x.shape
  k, feats = kernel.shape[0], kernel.shape[-1]
  cols = _columns(x.astype(compute_dtype), k)
  w = kernel.astype(compute_dtype).reshape(-1, feats)
  y = jnp.dot(cols, w, preferred_element_type=jnp.float32)
  return y.reshape(b, *[n - k + 1 for n in spatial], feats), (cols, kernel)


def _im2col_conv_bwd(compute_dtype, residuals, dy):
  cols, kernel = residuals
  k, cin, feats = kernel.shape[0], kernel.shape[-2], kernel.shape[-1]
  dy2 = dy.reshape(-1, feats).astype(compute_dtype)
  dkernel = jnp.dot(cols.T, dy2, preferred_element_type=jnp.float32).reshape(kernel.shape)
  w = kernel.astype(compute_dtype).reshape(-1, feats)
  dcols = jnp.dot(dy2, w.T, preferred_element_type=jnp.float32)
  # Dead code (and removed by XLA) for the first layer, whose input needs no gradient.
  dx = _col2im(dcols.reshape(*dy.shape[:-1], k, k, k, cin))
  return dx, dkernel.astype(kernel.dtype)


_im2col_conv.defvjp(_im2col_conv_fwd, _im2col_conv_bwd)


def im2col_conv3d(x: jax.Array, kernel: jax.Array, compute_dtype: Any = jnp.float32) -> jax.Array:
  """VALID, stride-1 3D convolution as one gather plus one matmul (custom gradient).

  The gather reads the input through a precomputed flat window index: one fused loop that writes
  each column row once, which measured faster on CPU than stacking k^3 shifted slices (those
  materialise k^3 intermediates) or than `lax.conv_general_dilated_patches` (itself a conv). The
  backward pass reuses the saved columns for the kernel gradient and overlap-adds the column
  gradients (`_col2im`) for the input gradient.

  Args:
    x: [B, D, H, W, C] float32 input.
    kernel: [k, k, k, C, F] weights.
    compute_dtype: dtype of the gathered columns and kernel in the matmuls (accumulation float32).

  Returns:
    [B, D-k+1, H-k+1, W-k+1, F] float32.
  """
  return _im2col_conv(x.astype(jnp.float32), kernel, compute_dtype)


def xla_conv3d(x: jax.Array, kernel: jax.Array, compute_dtype: Any = jnp.float32) -> jax.Array:
  """VALID, stride-1 3D convolution through `lax.conv_general_dilated` (same contract as im2col)."""
  return lax.conv_general_dilated(
    x.astype(compute_dtype),
    kernel.astype(compute_dtype),
    window_strides=(1, 1, 1),
    padding='VALID',
    dimension_numbers=_CONV_DIMS,
    preferred_element_type=jnp.float32,
  )
