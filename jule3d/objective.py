"""Backward pass of JULE (method §4): in-batch triplets, the weighted triplet loss, SGD, train_step.

Static shapes throughout: a batch of B samples always yields B(B-1)/2 * K triplet slots (K = the
static negatives-per-pair cap) with a validity mask, so one compiled train_step serves every batch,
including a padded last batch (`valid` mask) and batches with few or no same-cluster pairs.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jule3d import symmetries
from jule3d.model import JuleCNN, init_variables


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during phase-1 training; arrays only, so orbax can checkpoint it.

  The model and the optimiser are static and passed to `make_train_step` instead.

  Attributes:
    params: network parameters.
    batch_stats: BatchNorm running statistics.
    opt_state: optax state (its step count drives the learning-rate schedule).
    step: int32 global SGD step, never reset between JULE periods.
    rng: raw uint32 PRNG key data [2]; step randomness is fold_in(rng, step).
  """

  params: Any
  batch_stats: Any
  opt_state: Any
  step: jax.Array
  rng: jax.Array


def lr_schedule(train_cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Torch/Caffe 'inv' policy: lr(it) = base * (1 + lr_gamma * it) ** -lr_power.

  Args:
    train_cfg: `config.train`.

  Returns:
    A schedule of the global step.
  """
  base = float(train_cfg.learning_rate)
  gamma = float(train_cfg.lr_gamma)
  power = float(train_cfg.lr_power)
  return lambda it: base * (1.0 + gamma * jnp.asarray(it, jnp.float32)) ** (-power)


class _TorchMomentumState(NamedTuple):
  velocity: Any
  count: jax.Array


def _torch_dampened_momentum(momentum: float) -> optax.GradientTransformation:
  """Torch7 optim.sgd, dampening = momentum: v = g at the first step, then v = m v + (1 - m) g."""

  def init_fn(params):
    return _TorchMomentumState(jax.tree.map(jnp.zeros_like, params), jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    first = state.count == 0
    velocity = jax.tree.map(
      lambda g, v: jnp.where(first, g, momentum * v + (1.0 - momentum) * g), updates, state.velocity
    )
    return velocity, _TorchMomentumState(velocity, optax.safe_int32_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """SGD with momentum, L2 weight decay on every parameter, and the 'inv' learning-rate schedule.

  Order as in Torch: g += weight_decay * param; v = momentum * v + g (or the dampened variant);
  param -= lr(it) * v, with `it` the optimiser's own update count. The count lives in opt_state,
  so keep one opt_state for the whole run (never re-init it between periods) and `it` is the global
  step, also across checkpoint/resume.

  Args:
    train_cfg: `config.train`.

  Returns:
    The optax transformation.
  """
  momentum = float(train_cfg.momentum)
  if train_cfg.dampened_momentum:
    trace = _torch_dampened_momentum(momentum)
  else:
    trace = optax.trace(decay=momentum, nesterov=False)
  return optax.chain(
    optax.add_decayed_weights(float(train_cfg.weight_decay)),
    trace,
    optax.scale_by_learning_rate(lr_schedule(train_cfg)),
  )


def neg_slots(batch_size: int, num_neg: int) -> int:
  """Static negatives-per-pair cap K = min(num_neg, B - 2) (at least 1).

  A batch with a same-cluster pair has at most B - 2 samples of other clusters, hence at most
  B - 2 clusters besides the pair's, so min(num_neg, clusters - 1) never exceeds K: no truncation.

  Args:
    batch_size: B.
    num_neg: `config.train.num_neg`.

  Returns:
    K.
  """
  return max(1, min(num_neg, batch_size - 2))


@functools.partial(jax.jit, static_argnames='num_neg')
def triplets(
  labels: jax.Array, num_neg: int, rng: jax.Array, valid: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """All in-batch triplets of method §4, padded to a static count with a validity mask.

  For every unordered pair (m < n) of valid samples with labels[m] == labels[n] (anchor m, positive
  n), num_neg_eff = min(num_neg, clusters_in_batch - 1) negatives are drawn without replacement,
  uniformly among the valid samples whose label differs from the anchor's. clusters_in_batch counts
  distinct labels among valid samples. Sampling: each pair draws an independent uniform key per
  batch sample; non-candidates get key -1; `lax.top_k` takes the K largest keys (a uniformly random
  ordered K-subset of the candidates), of which the first num_neg_eff are kept.

  Slot p * K + j holds negative j of pair p, pairs in `np.triu_indices(B, 1)` order.

  Args:
    labels: [B] int cluster labels.
    num_neg: negatives per pair cap (static: jitted once per batch size and num_neg).
    rng: PRNG key.
    valid: optional [B] bool; False marks batch padding, never used in any triplet.

  Returns:
    (anchor, positive, negative, mask): int32 [T] sample indices and bool [T] validity,
    T = B(B-1)/2 * neg_slots(B, num_neg).
  """
  b = labels.shape[0]
  k = neg_slots(b, num_neg)
  valid = jnp.ones((b,), bool) if valid is None else jnp.asarray(valid, bool)
  m_idx, n_idx = (jnp.asarray(i, jnp.int32) for i in np.triu_indices(b, 1))
  same = labels[:, None] == labels[None, :]

  earlier = jnp.asarray(np.tri(b, k=-1, dtype=bool))  # [i, j] = j < i
  seen_before = jnp.any(same & earlier & valid[None, :], axis=1)
  num_clusters = jnp.sum(valid & ~seen_before)
  num_neg_eff = jnp.minimum(num_neg, num_clusters - 1)

  pair_ok = valid[m_idx] & valid[n_idx] & same[m_idx, n_idx]
  candidate = valid[None, :] & ~same[m_idx]  # [P, B]
  keys = jnp.where(candidate, jax.random.uniform(rng, candidate.shape), -1.0)
  top, negative = jax.lax.top_k(keys, k)  # [P, K]
  neg_ok = (top >= 0) & (jnp.arange(k)[None, :] < num_neg_eff) & pair_ok[:, None]

  anchor = jnp.repeat(m_idx, k)
  positive = jnp.repeat(n_idx, k)
  return anchor, positive, negative.reshape(-1).astype(jnp.int32), neg_ok.reshape(-1)


def triplet_loss(
  emb: jax.Array,
  anchor: jax.Array,
  positive: jax.Array,
  negative: jax.Array,
  mask: jax.Array,
  gamma: float,
  margin: float,
  anchor_only_grad: bool = False,
) -> jax.Array:
  """Mean over valid triplets of max(0, gamma * ||a - p||^2 - ||a - n||^2 + margin).

  Distances come from the B x B matrix ||e_i||^2 + ||e_j||^2 - 2 e_i.e_j (one small matmul) and
  are gathered per triplet: the ~10^5 triplets of a paper batch never materialise [T, D] arrays.

  Args:
    emb: [B, D] embeddings.
    anchor: [T] anchor indices.
    positive: [T] positive indices.
    negative: [T] negative indices.
    mask: [T] bool, True for real triplets.
    gamma: weight of the anchor-positive distance.
    margin: triplet margin.
    anchor_only_grad: gradients through the anchors only (positives and negatives held constant),
      the released-Torch variant.

  Returns:
    Scalar float32 loss; 0 (with zero gradient) when no triplet is valid.
  """
  emb = emb.astype(jnp.float32)
  other = jax.lax.stop_gradient(emb) if anchor_only_grad else emb
  # Row i carries the anchor's gradient, column j the positive's/negative's.
  sq_row = jnp.sum(jnp.square(emb), axis=-1)
  sq_col = jnp.sum(jnp.square(other), axis=-1)
  gram = jnp.dot(emb, other.T, precision=jax.lax.Precision.HIGHEST)
  dist = jnp.maximum(sq_row[:, None] + sq_col[None, :] - 2.0 * gram, 0.0)
  hinge = jax.nn.relu(gamma * dist[anchor, positive] - dist[anchor, negative] + margin)
  count = jnp.sum(mask)
  return jnp.sum(jnp.where(mask, hinge, 0.0)) / jnp.maximum(count, 1).astype(jnp.float32)


def create_train_state(
  model: JuleCNN, tx: optax.GradientTransformation, rng: jax.Array, patch_size: int
) -> TrainState:
  """Fresh parameters, optimiser state, step 0.

  Args:
    model: the network.
    tx: from `make_optimizer`.
    rng: PRNG key (typed or raw); split into the init key and the state's training key.
    patch_size: patch edge w.

  Returns:
    The initial TrainState.
  """
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  init_rng, train_rng = jax.random.split(rng)
  variables = init_variables(model, init_rng, patch_size)
  return TrainState(
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    opt_state=tx.init(variables['params']),
    step=jnp.zeros([], jnp.int32),
    rng=train_rng,
  )


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  model: JuleCNN,
  tx: optax.GradientTransformation,
  cfg: ml_collections.ConfigDict,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on the triplet loss (pure; jit it through `make_train_step`).

  Args:
    state: current TrainState.
    batch: {'patches': [B, w, w, w] float32 normalised, 'labels': [B] int32, 'valid': [B] bool}.
      Invalid (padding) samples are zeroed, left out of the BatchNorm statistics and of every
      triplet.
    model: the network.
    tx: the optimiser.
    cfg: `config.train`.

  Returns:
    (new state, metrics) with metrics {'loss', 'num_triplets', 'lr', 'grad_norm'}; the loss is
    returned as is (the caller checks it is finite).
  """
  valid = jnp.asarray(batch['valid'], bool)
  patches = jnp.where(valid[:, None, None, None], batch['patches'], 0.0)
  rng = jax.random.fold_in(state.rng, state.step)
  if cfg.augment == 'symmetries':
    which = symmetries.draw(jax.random.fold_in(rng, 1), patches.shape[0])
    patches = symmetries.apply(patches, which)
  anchor, positive, negative, mask = triplets(batch['labels'], int(cfg.num_neg), rng, valid)

  def loss_fn(params):
    emb, updates = model.apply(
      {'params': params, 'batch_stats': state.batch_stats},
      patches,
      train=True,
      mask=valid,
      mutable=['batch_stats'],
    )
    loss = triplet_loss(
      emb,
      anchor,
      positive,
      negative,
      mask,
      float(cfg.gamma),
      float(cfg.margin),
      bool(cfg.anchor_only_grad),
    )
    return loss, updates['batch_stats']

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
    'loss': loss,
    'num_triplets': jnp.sum(mask, dtype=jnp.int32),
    'lr': lr_schedule(cfg)(state.step),
    'grad_norm': optax.tree.norm(grads),
  }
  new_state = state.replace(
    params=params, batch_stats=batch_stats, opt_state=opt_state, step=state.step + 1
  )
  return new_state, metrics


def make_train_step(
  model: JuleCNN, tx: optax.GradientTransformation, train_cfg: ml_collections.ConfigDict
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """`train_step` with model, optimiser and config bound, jitted once, donating the old state.

  Args:
    model: the network.
    tx: the optimiser.
    train_cfg: `config.train`.

  Returns:
    step_fn(state, batch) -> (state, metrics). Do not reuse a state after passing it in.
  """
  # A frozen copy: later edits to the caller's config cannot disagree with the compiled step.
  cfg = ml_collections.FrozenConfigDict(train_cfg)
  step = functools.partial(train_step, model=model, tx=tx, cfg=cfg)
  return jax.jit(step, donate_argnums=0)
