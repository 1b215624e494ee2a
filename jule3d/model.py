"""The 3D JULE CNN (method §2): three VALID 3D convolutions, two dense layers, L2-normalised output.

Two extensions of the paper's network, each off in the paper's configs (method §7):
  head 'mean'      the dense layers see each channel of the last convolution's map averaged over
                   the map instead of the map position by position ('flatten'): the same features
                   for any shift of a texture (two patches of one random-phase texture have nearly
                   uncorrelated voxels but the same filter energies);
  centre_size c    the patch's central c^3 voxels go straight to the dense layers beside the
                   convolutions' output: a full-resolution path for the intensity at the centre,
                   which the convolutions and the pooling otherwise mix with the whole patch.

The convolutions (xla, im2col, oneDNN, and conv_impl 'auto') are in jule3d/convolution.py.
With dtype 'bfloat16' activations and kernels are cast to bfloat16 for the convolutions and dense
layers, which accumulate and return float32; parameters, BatchNorm and the output stay float32.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jule3d.convolution import conv3d_fn, resolve_conv_impl

_NORM_EPS = 1e-10  # method §2: x / (||x|| + 1e-10).


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
  # What the network returns: 'embedding' (the L2-normalised output the triplet loss trains) or
  # 'hidden' (the first dense layer's ReLU output, which the output layer reads; config.segment.layer).
  output: str = 'embedding'
  dtype: str = 'float32'
  head: str = 'flatten'
  centre_size: int = 0

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
      [B, embed_dim] float32 embeddings, rows of norm ~1 (0 for an all-zero pre-normalised row);
      with `output='hidden'`, [B, hidden_dim], the first dense layer's ReLU output.
    """
    impl = resolve_conv_impl(self.conv_impl, self.dtype)
    cdt = jnp.bfloat16 if self.dtype == 'bfloat16' else jnp.float32
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 4:
      x = x[..., None]
    if self.centre_size:
      lo = x.shape[1] // 2 - self.centre_size // 2
      hi = lo + self.centre_size
      centre = x[:, lo:hi, lo:hi, lo:hi, 0].reshape(x.shape[0], -1)
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
    x = x.reshape(x.shape[0], -1) if self.head == 'flatten' else jnp.mean(x, axis=(1, 2, 3))
    if self.centre_size:
      x = jnp.concatenate([x, centre], axis=1)
    self.sow('intermediates', 'flatten', x)
    x = nn.relu(Dense(self.hidden_dim, self.init_std, cdt, name='fc1')(x))
    if self.output == 'hidden':
      return x
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
    head=str(model_cfg.head),
    centre_size=int(model_cfg.centre_size),
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


def edges(patch_size: int, kernel_size: int, pool_size: int) -> tuple[int, int, int, int]:
  """The layer layout's per-patch edges (method §2; VALID): conv1 out, pooled, conv2 out, conv3 out.

  The one closed form of the network's geometry, used by the dense path (NetSpec), the config
  check (checks.py) and flops_per_patch; layer_shapes traces the network itself. The last edge is
  <= 0 when the patch is too small for the network.
  """
  e1 = patch_size - kernel_size + 1
  e2 = e1 // pool_size
  return e1, e2, e2 - kernel_size + 1, e2 - 2 * (kernel_size - 1)


def fc1_inputs(channels: int, last_edge: int, head: str, centre_size: int) -> int:
  """Width of the first dense layer's input: the last conv map as the head gives it, plus the
  centre path's voxels."""
  return (last_edge**3 if head == 'flatten' else 1) * channels + centre_size**3


@dataclasses.dataclass(frozen=True)
class NetSpec:
  """The network's hyper-parameters for one patch size (hashable: a jit key of the dense path)."""

  conv_features: tuple[int, ...]
  kernel_size: int
  pool_size: int
  hidden_dim: int
  embed_dim: int
  bn_epsilon: float
  impl: str  # resolved conv_impl: 'xla', 'im2col' or 'onednn'
  dtype: str
  patch_size: int
  head: str = 'flatten'
  centre_size: int = 0
  output: str = 'embedding'

  @property
  def width(self) -> int:
    """Width of the features the network returns (JuleCNN.output)."""
    return self.hidden_dim if self.output == 'hidden' else self.embed_dim

  def edges(self) -> tuple[int, int, int, int]:
    """Per-patch edges: conv1 output, pooled, conv2 output, conv3 output (module `edges`)."""
    return edges(self.patch_size, self.kernel_size, self.pool_size)


def net_spec(net: JuleCNN, patch_size: int) -> NetSpec:
  """The NetSpec of a built network (its conv_impl resolved for this backend)."""
  return NetSpec(
    conv_features=tuple(int(f) for f in net.conv_features),
    kernel_size=int(net.kernel_size),
    pool_size=int(net.pool_size),
    hidden_dim=int(net.hidden_dim),
    embed_dim=int(net.embed_dim),
    bn_epsilon=float(net.bn_epsilon),
    impl=resolve_conv_impl(str(net.conv_impl), str(net.dtype)),
    dtype=str(net.dtype),
    patch_size=int(patch_size),
    head=str(net.head),
    centre_size=int(net.centre_size),
    output=str(net.output),
  )


def net_spec_of_config(model_cfg: ml_collections.ConfigDict, patch_size: int) -> NetSpec:
  """The NetSpec of `config.model`."""
  return net_spec(build_model(model_cfg), patch_size)


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
  c1, c2, c3 = (int(f) for f in model_cfg.conv_features)
  e1, _, e3, e4 = edges(patch_size, k, int(model_cfg.pool_size))
  hidden, embed = int(model_cfg.hidden_dim), int(model_cfg.embed_dim)
  convs = 2 * k**3 * (e1**3 * c1 + e3**3 * c1 * c2 + e4**3 * c2 * c3)
  flat = fc1_inputs(c3, e4, str(model_cfg.head), int(model_cfg.centre_size))
  return convs + 2 * flat * hidden + 2 * hidden * embed


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
    [B, NetSpec.width] float32: the L2-normalised embedding, or the hidden layer (model.output).
  """
  return model.apply(
    {'params': variables['params'], 'batch_stats': variables['batch_stats']}, patches, train=False
  )


def make_embed_fn(model: JuleCNN) -> Callable[[dict[str, Any], jax.Array], jax.Array]:
  """`embed` with the model bound: `fn(variables, patches) -> [B, NetSpec.width]` (jitted).

  Args:
    model: the network.

  Returns:
    The feature function.
  """
  return functools.partial(embed, model)
