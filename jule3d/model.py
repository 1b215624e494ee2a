"""The 3D JULE CNN (method §2): three VALID 3D convolutions, two dense layers, L2-normalised output.

Two formulations of the 3D convolution share one parameter tree (`kernel` [k,k,k,in,out] and `bias`,
the `flax.linen.Conv` layout), so a checkpoint trained with one runs with the other:
  'xla'     `lax.conv_general_dilated`: cuDNN on GPU, the native convolution on TPU.
  'im2col'  gather every k^3 window into a column matrix, then one matmul. XLA's CPU conv3d ran at
            14-17 GFLOP/s and its matmul at 269 (BENCHMARKS.md, "CNN throughput"); the gather
            costs memory (~0.6 GB per 100 paper patches for conv1) but wins on CPU.
  'onednn'  oneDNN's direct convolution, forward and both gradients, through XLA's FFI
            (jule3d/onednn.py): float32 on the CPU, no materialised columns.
  'auto'    on the CPU backend oneDNN where the extension is built and the dtype is float32, else
            im2col; xla on GPU/TPU (decided at trace time).
With dtype 'bfloat16' activations and kernels are cast to bfloat16 for the convolutions and dense
layers, which accumulate and return float32; parameters, BatchNorm and the output stay float32.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax

_NORM_EPS = 1e-10  # method §2: x / (||x|| + 1e-10).
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


class Conv3D(nn.Module):
  """VALID stride-1 3D convolution: `nn.Conv` parameter layout, a choice of formulation."""

  features: int
  kernel_size: int
  init_std: float
  impl: str  # 'xla', 'im2col' or 'onednn' (already resolved).
  compute_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param(
      'kernel',
      nn.initializers.normal(self.init_std),
      (k, k, k, x.shape[-1], self.features),
      jnp.float32,
    )
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    return conv3d_fn(self.impl)(x, kernel, self.compute_dtype) + bias


class Dense(nn.Module):
  """`nn.Dense` parameter layout; float32 accumulation and output whatever the compute dtype."""

  features: int
  init_std: float
  compute_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
      'kernel', nn.initializers.normal(self.init_std), (x.shape[-1], self.features), jnp.float32
    )
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    y = jnp.dot(
      x.astype(self.compute_dtype),
      kernel.astype(self.compute_dtype),
      preferred_element_type=jnp.float32,
    )
    return y + bias


def max_pool3d(x: jax.Array, size: int) -> jax.Array:
  """Max-pool with window = stride = `size`, VALID (trailing voxels that fill no window dropped).

  A reshape + max rather than `reduce_window`: same values, and its gradient is a cheap elementwise
  mask instead of select-and-scatter (ties, e.g. all-zero ReLU windows, share the gradient equally;
  those are ReLU zeros whose gradient is zero anyway).

  Args:
    x: [B, D, H, W, C].
    size: window edge and stride.

  Returns:
    [B, D // size, H // size, W // size, C].
  """
  b, d, h, w, c = x.shape
  od, oh, ow = d // size, h // size, w // size
  x = x[:, : od * size, : oh * size, : ow * size]
  x = x.reshape(b, od, size, oh, size, ow, size, c)
  return jnp.max(x, axis=(2, 4, 6))


def l2_normalize(x: jax.Array) -> jax.Array:
  """x / (||x|| + 1e-10) over the last axis, with a finite gradient at x = 0."""
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  # sqrt'(0) is infinite: route the zero case through a constant so an all-zero row gives a finite
  # gradient (the value is unchanged: 0 / (0 + eps) = 0).
  norm = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
  return x / (norm + _NORM_EPS)


class JuleCNN(nn.Module):
  """The network of method §2: Conv-BN-ReLU-Pool, 2 x Conv-BN-ReLU, Dense-ReLU, Dense, L2 norm.

  Attributes mirror `config.model` (see configs/base.py).
  """

  conv_features: tuple[int, ...] = (50, 50, 50)
  kernel_size: int = 5
  pool_size: int = 2
  hidden_dim: int = 1350
  embed_dim: int = 160
  init_std: float = 0.01
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  conv_impl: str = 'auto'
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
    """Embeds a batch of patches.

    Args:
      x: [B, w, w, w] or [B, w, w, w, 1] normalised patches.
      train: BatchNorm uses (and updates, `batch_stats` must be mutable) batch statistics when True,
        the running statistics otherwise.
      mask: optional [B] bool; samples where False (batch padding) are left out of the BatchNorm
        batch statistics. Only used when `train`.

    Returns:
      [B, embed_dim] float32 embeddings, rows of norm ~1 (0 for an all-zero pre-normalised row).
    """
    impl = resolve_conv_impl(self.conv_impl, self.dtype)
    cdt = jnp.bfloat16 if self.dtype == 'bfloat16' else jnp.float32
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 4:
      x = x[..., None]
    bn_mask = None
    if train and mask is not None:
      bn_mask = jnp.asarray(mask, bool).reshape(-1, 1, 1, 1, 1)
    bn = functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      scale_init=nn.initializers.uniform(1.0),
      bias_init=nn.initializers.zeros,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
    )
    for i, feats in enumerate(self.conv_features):
      x = Conv3D(feats, self.kernel_size, self.init_std, impl, cdt, name=f'conv{i + 1}')(x)
      x = nn.relu(bn(name=f'bn{i + 1}')(x, mask=bn_mask))
      if i == 0:
        x = max_pool3d(x, self.pool_size)
        self.sow('intermediates', 'pool1', x)
    x = x.reshape(x.shape[0], -1)
    self.sow('intermediates', 'flatten', x)
    x = nn.relu(Dense(self.hidden_dim, self.init_std, cdt, name='fc1')(x))
    x = Dense(self.embed_dim, self.init_std, cdt, name='fc2')(x)
    return l2_normalize(x)


def build_model(model_cfg: ml_collections.ConfigDict) -> JuleCNN:
  """The network of `config.model`.

  Args:
    model_cfg: `config.model` (configs/base.py fields).

  Returns:
    An (unbound) JuleCNN.
  """
  return JuleCNN(
    conv_features=tuple(int(f) for f in model_cfg.conv_features),
    kernel_size=int(model_cfg.kernel_size),
    pool_size=int(model_cfg.pool_size),
    hidden_dim=int(model_cfg.hidden_dim),
    embed_dim=int(model_cfg.embed_dim),
    init_std=float(model_cfg.init_std),
    bn_momentum=float(model_cfg.bn_momentum),
    bn_epsilon=float(model_cfg.bn_epsilon),
    conv_impl=str(model_cfg.conv_impl),
    dtype=str(model_cfg.dtype),
  )


def init_variables(model: JuleCNN, rng: jax.Array, patch_size: int) -> dict[str, Any]:
  """Initial parameters (method §2 distributions) and BatchNorm running statistics (mean 0, var 1).

  Same distributions as `model.init` (kernels N(0, init_std^2), biases 0, BN scale U(0, 1), BN
  offset 0) but drawn with one normal and one uniform call for the whole tree: XLA:CPU spends
  ~0.3-0.5 s compiling each random-number call site, which made `model.init` take 5-9 s even for a
  tiny network. The values differ from `model.init`'s for the same key.

  Args:
    model: the network.
    rng: PRNG key (typed or raw).
    patch_size: patch edge w.

  Returns:
    {'params': ..., 'batch_stats': ...}.
  """
  dummy = jax.ShapeDtypeStruct((1, patch_size, patch_size, patch_size), jnp.float32)
  abstract = jax.eval_shape(functools.partial(model.init, train=False), rng, dummy)
  params_abs, stats_abs = abstract['params'], abstract['batch_stats']

  def draw(key):
    paths, treedef = jax.tree_util.tree_flatten_with_path(params_abs)
    kinds = [path[-1].key for path, _ in paths]
    if not set(kinds) <= {'kernel', 'bias', 'scale'}:
      raise ValueError(f'unexpected parameter names {sorted(set(kinds))}')
    sizes = [int(np.prod(leaf.shape)) for _, leaf in paths]
    total = {kind: sum(n for n, k in zip(sizes, kinds, strict=True) if k == kind) for kind in kinds}
    key_n, key_u = jax.random.split(key)
    pools = {
      'kernel': model.init_std * jax.random.normal(key_n, (total.get('kernel', 0),)),
      'scale': jax.random.uniform(key_u, (total.get('scale', 0),)),
    }
    offsets = {'kernel': 0, 'scale': 0}
    leaves = []
    for (_, leaf), kind, n in zip(paths, kinds, sizes, strict=True):
      if kind == 'bias':
        leaves.append(jnp.zeros(leaf.shape, jnp.float32))
        continue
      leaves.append(pools[kind][offsets[kind] : offsets[kind] + n].reshape(leaf.shape))
      offsets[kind] += n
    stats = jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.full(leaf.shape, 1.0 if path[-1].key == 'var' else 0.0, jnp.float32),
      stats_abs,
    )
    return {'params': jax.tree.unflatten(treedef, leaves), 'batch_stats': stats}

  return jax.jit(draw)(rng)


def layer_shapes(model_cfg: ml_collections.ConfigDict, patch_size: int) -> list[tuple[str, tuple]]:
  """Output shape of every layer for one patch, traced with `jax.eval_shape` (no compute).

  Args:
    model_cfg: `config.model`.
    patch_size: patch edge w.

  Returns:
    [(name, shape)] in network order: input, conv1, pool1, conv2, conv3, flatten, fc1, fc2,
    embedding.
  """
  model = build_model(model_cfg)
  x = jax.ShapeDtypeStruct((1, patch_size, patch_size, patch_size), jnp.float32)

  def run(x):
    variables = model.init(jax.random.key(0), x, train=False)
    return model.apply(
      variables, x, train=False, capture_intermediates=True, mutable=['intermediates']
    )

  out, state = jax.eval_shape(run, x)
  inter = state['intermediates']
  names = ['conv1', 'pool1', 'conv2', 'conv3', 'flatten', 'fc1', 'fc2']
  shapes = [('input', x.shape)]
  for name in names:
    leaf = inter[name]['__call__'][0] if name.startswith(('conv', 'fc')) else inter[name][0]
    shapes.append((name, tuple(leaf.shape)))
  shapes.append(('embedding', tuple(out.shape)))
  return shapes


def flops_per_patch(model_cfg: ml_collections.ConfigDict, patch_size: int) -> int:
  """Forward-pass floating-point operations per patch (2 x multiply-adds of convs and dense layers).

  BatchNorm, ReLU, pooling and normalisation are left out (<1% for the paper model, ~387 MFLOP).

  Args:
    model_cfg: `config.model`.
    patch_size: patch edge w.

  Returns:
    FLOPs per patch.
  """
  k = int(model_cfg.kernel_size)
  edge, cin, total = patch_size, 1, 0
  for i, cout in enumerate(model_cfg.conv_features):
    edge = edge - k + 1
    total += 2 * edge**3 * k**3 * cin * cout
    cin = cout
    if i == 0:
      edge //= int(model_cfg.pool_size)
  flat = edge**3 * cin
  total += 2 * flat * int(model_cfg.hidden_dim) + 2 * int(model_cfg.hidden_dim) * int(
    model_cfg.embed_dim
  )
  return total


@functools.partial(jax.jit, static_argnames='model')
def embed(model: JuleCNN, variables: dict[str, Any], patches: jax.Array) -> jax.Array:
  """Eval-mode features (BatchNorm running statistics) of a batch of patches.

  Jitted with the model static, so one compile per (model, batch shape): callers pad the last batch.
  Works on any backend and on batch-sharded inputs (jit propagates the sharding).

  Args:
    model: the network.
    variables: {'params', 'batch_stats'}.
    patches: [B, w, w, w] normalised patches.

  Returns:
    [B, embed_dim] float32 L2-normalised features.
  """
  return model.apply(
    {'params': variables['params'], 'batch_stats': variables['batch_stats']}, patches, train=False
  )


def make_embed_fn(model: JuleCNN) -> Callable[[dict[str, Any], jax.Array], jax.Array]:
  """`embed` with the model bound: `fn(variables, patches) -> [B, embed_dim]` (jitted).

  Args:
    model: the network.

  Returns:
    The feature function.
  """
  return functools.partial(embed, model)
