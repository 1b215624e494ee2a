"""Tests for jule3d.objective: triplet construction, loss, optimiser, TrainState and train_step."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from jule3d import model as model_lib
from jule3d import objective


def valid_triplets(labels, num_neg, seed, valid=None):
  out = objective.triplets(jnp.asarray(labels, jnp.int32), num_neg, jax.random.key(seed), valid)
  a, p, n, m = (np.asarray(x) for x in out)
  return a, p, n, m


@pytest.mark.parametrize('num_neg', [2, 5])
def test_triplets_counts_and_constraints(num_neg):
  labels = np.array([0, 0, 0, 1, 1, 2, 3, 3])
  # Same-cluster pairs: 3 in cluster 0, 1 in cluster 1, 1 in cluster 3; 4 clusters in the batch.
  expected_pairs = {(0, 1), (0, 2), (1, 2), (3, 4), (6, 7)}
  per_pair = min(num_neg, 4 - 1)
  for seed in range(5):
    a, p, n, m = valid_triplets(labels, num_neg, seed)
    k = objective.neg_slots(8, num_neg)
    assert a.shape == p.shape == n.shape == m.shape == (8 * 7 // 2 * k,)
    assert m.sum() == len(expected_pairs) * per_pair
    a, p, n = a[m], p[m], n[m]
    assert np.all(labels[a] == labels[p]) and np.all(a < p)
    assert np.all(labels[n] != labels[a])
    for pair in expected_pairs:
      negs = n[(a == pair[0]) & (p == pair[1])]
      assert len(negs) == per_pair
      assert len(set(negs.tolist())) == per_pair  # without replacement
    assert set(zip(a.tolist(), p.tolist(), strict=True)) == expected_pairs


def test_triplets_negatives_cover_all_candidates():
  # Pair (0, 1); one negative from the six other-cluster samples: over many draws every
  # candidate must appear, roughly uniformly (expected 50 each out of 300).
  labels = np.array([0, 0, 1, 2, 3, 4, 5, 6])
  counts = np.zeros(8, int)
  for seed in range(300):
    a, p, n, m = valid_triplets(labels, 1, seed)
    assert m.sum() == 1
    counts[n[m][0]] += 1
  assert counts[:2].sum() == 0
  assert counts[2:].min() > 25 and counts[2:].max() < 80


def test_triplets_padding_never_used():
  labels = np.array([0, 0, 1, 2, 0, 5, 5])
  valid = jnp.array([True, True, True, False, False, False, False])
  for seed in range(20):
    a, p, n, m = valid_triplets(labels, 20, seed, valid)
    # Valid clusters {0, 1}: one pair (0, 1), min(20, 2 - 1) = 1 negative, necessarily sample 2.
    assert m.sum() == 1
    assert (a[m][0], p[m][0], n[m][0]) == (0, 1, 2)
    used = np.concatenate([a[m], p[m], n[m]])
    assert not np.isin(used, [3, 4, 5, 6]).any()


@pytest.mark.parametrize('labels', [[3, 3, 3, 3], [0, 1, 2, 3, 4], [7]])
def test_triplets_none_possible(labels):
  a, p, n, m = valid_triplets(np.array(labels), 20, 0)
  assert m.sum() == 0


def test_triplets_static_shape_single_compile():
  fn = jax.jit(objective.triplets, static_argnames='num_neg')
  rng = jax.random.key(0)
  sizes = set()
  for labels in ([0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0], [0, 1, 2, 3, 4, 5]):
    out = fn(jnp.asarray(labels, jnp.int32), num_neg=3, rng=rng, valid=jnp.ones(6, bool))
    sizes.add(out[0].shape)
  assert sizes == {(15 * 3,)}
  assert fn._cache_size() == 1


def hinge_reference(emb, triplets, gamma, margin):
  total = 0.0
  for a, p, n in triplets:
    d_ap = np.sum((emb[a] - emb[p]) ** 2)
    d_an = np.sum((emb[a] - emb[n]) ** 2)
    total += max(0.0, gamma * d_ap - d_an + margin)
  return total / len(triplets)


def test_triplet_loss_hand_computed():
  emb = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]], np.float32)
  # (0,1,2): 2*0.8 - 2.0 + 0.2 = -0.2 -> 0.   (0,1,3): 2*0.8 - 4.0 + 0.2 < 0 -> 0.
  # (1,2,0): 2*0.4 - 0.8 + 0.2 = 0.2.           (2,1,3): 2*0.4 - 2.0 + 0.2 < 0 -> 0.
  # (0,2,1): 2*2.0 - 0.8 + 0.2 = 3.4.           Masked slot (3,0,1) must be ignored.
  trip = [(0, 1, 2), (0, 1, 3), (1, 2, 0), (2, 1, 3), (0, 2, 1)]
  a, p, n = (jnp.array([t[i] for t in trip] + [3]) for i in range(3))
  mask = jnp.array([True] * 5 + [False])
  loss = objective.triplet_loss(jnp.asarray(emb), a, p, n, mask, 2.0, 0.2)
  np.testing.assert_allclose(float(loss), (0.2 + 3.4) / 5, rtol=1e-6)
  np.testing.assert_allclose(float(loss), hinge_reference(emb, trip, 2.0, 0.2), rtol=1e-6)


def test_triplet_loss_no_valid_triplet_is_zero():
  emb = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.float32)
  idx = jnp.array([0, 1])
  mask = jnp.zeros(2, bool)
  loss, grad = jax.value_and_grad(objective.triplet_loss)(emb, idx, idx, idx, mask, 2.0, 0.2)
  assert float(loss) == 0.0
  assert np.all(np.asarray(grad) == 0)


@pytest.mark.parametrize('anchor_only', [False, True])
def test_triplet_loss_gradients(anchor_only):
  rng = np.random.default_rng(1)
  emb = rng.standard_normal((5, 3)).astype(np.float32)
  trip = [(0, 1, 2), (0, 1, 3), (2, 4, 1), (3, 4, 0)]
  a, p, n = (jnp.array([t[i] for t in trip]) for i in range(3))
  mask = jnp.ones(4, bool)
  gamma, margin = 2.0, 3.0  # a large margin keeps every hinge active
  grad = jax.grad(objective.triplet_loss)(
    jnp.asarray(emb), a, p, n, mask, gamma, margin, anchor_only
  )
  expected = np.zeros_like(emb)
  for ia, ip, i_n in trip:
    assert gamma * np.sum((emb[ia] - emb[ip]) ** 2) - np.sum((emb[ia] - emb[i_n]) ** 2) + margin > 0
    expected[ia] += 2 * gamma * (emb[ia] - emb[ip]) - 2 * (emb[ia] - emb[i_n])
    if not anchor_only:
      expected[ip] += -2 * gamma * (emb[ia] - emb[ip])
      expected[i_n] += 2 * (emb[ia] - emb[i_n])
  np.testing.assert_allclose(np.asarray(grad), expected / len(trip), rtol=1e-5, atol=1e-6)


def train_cfg(**overrides):
  cfg = base.get_config().train
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def test_lr_schedule_values():
  cfg = train_cfg()
  schedule = objective.lr_schedule(cfg)
  for it in (0, 1, 100, 10_000, 250_000):
    np.testing.assert_allclose(float(schedule(it)), 0.01 * (1 + 1e-4 * it) ** -0.75, rtol=1e-6)
  # The optimiser applies the same schedule to its own step count: with momentum and weight
  # decay off and a unit gradient, the update at step t is exactly -lr(t).
  cfg = train_cfg(momentum=0.0, weight_decay=0.0, lr_gamma=0.5)
  tx = objective.make_optimizer(cfg)
  params = {'w': jnp.zeros(2)}
  state = tx.init(params)
  for it in range(4):
    updates, state = tx.update({'w': jnp.ones(2)}, state, params)
    np.testing.assert_allclose(np.asarray(updates['w']), -0.01 * (1 + 0.5 * it) ** -0.75, rtol=1e-6)


@pytest.mark.parametrize('dampened', [False, True])
def test_sgd_matches_hand_written_torch_sgd(dampened):
  cfg = train_cfg(weight_decay=0.05, lr_gamma=0.1, dampened_momentum=dampened)
  rng = np.random.default_rng(2)
  params = {'a': rng.standard_normal(3), 'b': {'c': rng.standard_normal((2, 2))}}
  tx = objective.make_optimizer(cfg)
  jparams = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = tx.init(jparams)
  velocity = None
  dampening = 0.9 if dampened else 0.0
  for it in range(5):
    grads = jax.tree.map(lambda x: rng.standard_normal(x.shape), params)
    updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, jparams)
    jparams = optax.apply_updates(jparams, updates)
    # Torch: d_p = g + wd * p; buf = d_p at the first step, else m * buf + (1 - damp) * d_p;
    # p -= lr * buf.
    d_p = jax.tree.map(lambda g, p: g + 0.05 * p, grads, params)
    if velocity is None:
      velocity = d_p
    else:
      velocity = jax.tree.map(lambda v, d: 0.9 * v + (1 - dampening) * d, velocity, d_p)
    lr = 0.01 * (1 + 0.1 * it) ** -0.75
    params = jax.tree.map(lambda p, v, lr=lr: p - lr * v, params, velocity)
  for got, want in zip(jax.tree.leaves(jparams), jax.tree.leaves(params), strict=True):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope='module')
def tiny():
  """A tiny network (15^3 patches, 3^3 kernels, widths 4) and its compiled train step."""
  cfg = base.get_config()
  cfg.model.conv_features = (4, 4, 4)
  cfg.model.kernel_size = 3
  cfg.model.hidden_dim = 32
  cfg.model.embed_dim = 8
  cfg.model.init_std = 0.2  # O(1) pre-normalised outputs in a network this narrow.
  cfg.train.batch_size = 12
  cfg.train.num_neg = 3
  model = model_lib.build_model(cfg.model)
  tx = objective.make_optimizer(cfg.train)
  return cfg, model, tx, objective.make_train_step(model, tx, cfg.train)


def toy_batch(labels, valid=None, w=15, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.asarray(labels, np.int32)
  # Separable: each cluster is a different mean intensity plus noise.
  x = rng.standard_normal((len(labels), w, w, w)).astype(np.float32) + labels[:, None, None, None]
  valid = np.ones(len(labels), bool) if valid is None else np.asarray(valid)
  return {'patches': jnp.asarray(x), 'labels': jnp.asarray(labels), 'valid': jnp.asarray(valid)}


def test_train_step_reduces_loss_and_updates_state(tiny):
  _, model, tx, step = tiny
  state = objective.create_train_state(model, tx, jax.random.key(0), 15)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
  stats0 = jax.tree.map(np.asarray, state.batch_stats)
  batch = toy_batch(np.repeat(np.arange(3), 4))
  losses = []
  for i in range(8):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
    assert int(metrics['num_triplets']) == 3 * 6 * min(3, 2)  # 3 clusters x 6 pairs x 2 negatives
    np.testing.assert_allclose(float(metrics['lr']), 0.01 * (1 + 1e-4 * i) ** -0.75, rtol=1e-6)
    assert np.isfinite(float(metrics['grad_norm']))
  assert int(state.step) == 8
  assert losses[0] > 0.2 and losses[-1] < 0.5 * losses[0], losses
  moved = jax.tree.map(lambda a, b: np.max(np.abs(np.asarray(a) - b)), state.batch_stats, stats0)
  assert min(jax.tree.leaves(moved)) > 0  # every BN running statistic was updated


def test_train_step_padding_is_inert(tiny):
  _, model, tx, step = tiny
  labels = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
  results = []
  # The same 10 real samples, padded to 12 with zeros / NaNs and arbitrary labels.
  for fill, pad_labels in ((0.0, [0, 0]), (np.nan, [5, 1])):
    batch = toy_batch(labels + pad_labels, valid=[True] * 10 + [False] * 2)
    batch['patches'] = batch['patches'].at[10:].set(fill)
    state = objective.create_train_state(model, tx, jax.random.key(3), 15)
    results.append(step(state, batch))
  (s1, m1), (s2, m2) = results
  assert np.isfinite(float(m2['loss']))
  assert float(m1['loss']) == float(m2['loss'])
  # Pairs 6 + 3 + 3, min(3, 3 - 1) = 2 negatives each.
  assert int(m1['num_triplets']) == int(m2['num_triplets']) == 24
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert step._cache_size() == 1  # one compile for every batch of this shape


def test_create_train_state_rng_is_raw_key_data(tiny):
  _, model, tx, _ = tiny
  s1 = objective.create_train_state(model, tx, jax.random.key(5), 15)
  s2 = objective.create_train_state(model, tx, jax.random.PRNGKey(5), 15)
  assert s1.rng.dtype == jnp.uint32 and s1.step.dtype == jnp.int32
  # Typed and raw keys of the same seed give the same state (checkpoints are key-type agnostic).
  for a, b in itertools.zip_longest(jax.tree.leaves(s1), jax.tree.leaves(s2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
