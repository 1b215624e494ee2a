"""The cube's 48 symmetries on training patches (config.train.augment = 'symmetries')."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

from configs import demo
from jule3d import model, objective, symmetries


def _reference(x, g):
  """Symmetry g by numpy transposes and flips, in index_table's order."""
  order, flips = list(
    itertools.product(itertools.permutations(range(3)), itertools.product((0, 1), repeat=3))
  )[g]
  y = np.transpose(x, order)
  return np.flip(y, [a for a in range(3) if flips[a]])


def test_the_48_transforms_are_distinct_bijections_fixing_the_centre():
  w = 5
  table = symmetries.index_table(w)
  assert table.shape == (48, w**3) and len({tuple(r) for r in table}) == 48
  assert all(np.array_equal(np.sort(r), np.arange(w**3)) for r in table)
  np.testing.assert_array_equal(table[0], np.arange(w**3))
  centre = (w**3) // 2
  assert (table[:, centre] == centre).all()
  # A group: composing two transforms gives one of the 48.
  rows = {tuple(r) for r in table}
  assert all(tuple(table[a][table[b]]) in rows for a in range(0, 48, 7) for b in range(0, 48, 5))


def test_apply_transforms_each_patch_by_its_own_symmetry():
  x = np.random.default_rng(0).standard_normal((6, 5, 5, 5)).astype(np.float32)
  which = np.array([0, 1, 9, 17, 30, 47], np.int32)
  got = np.asarray(symmetries.apply(jnp.asarray(x), jnp.asarray(which)))
  for b, g in enumerate(which):
    np.testing.assert_array_equal(got[b], _reference(x[b], g))
  assert not np.array_equal(got[5], x[5])


def test_train_step_draws_symmetries_only_when_asked_and_is_deterministic():
  c = demo.get_config()
  c.patches.patch_size = 15
  c.model.conv_features, c.model.hidden_dim, c.model.embed_dim = (4, 4, 4), 8, 4
  c.train.batch_size = 8
  net = model.build_model(c.model)
  tx = objective.make_optimizer(c.train)
  rng = np.random.default_rng(1)
  batch = {
    'patches': jnp.asarray(rng.standard_normal((8, 15, 15, 15)), jnp.float32),
    'labels': jnp.asarray([0, 0, 1, 1, 2, 2, 0, 1], jnp.int32),
    'valid': jnp.ones(8, bool),
  }

  def loss(aug):
    c.train.augment = aug
    step = objective.make_train_step(net, tx, c.train)
    state = objective.create_train_state(net, tx, jax.random.PRNGKey(3), 15)
    return float(step(state, batch)[1]['loss'])

  # The same draw from the same state and step (resumable), and a different loss than without.
  assert loss('symmetries') == loss('symmetries')
  assert loss('symmetries') != loss('none')


def test_runs_trained_before_the_option_existed_keep_their_fingerprint():
  from jule3d import checkpoint

  c = demo.get_config().to_dict()
  before = json.loads(json.dumps(c))
  del before['train']['augment']
  assert checkpoint.fingerprint(c) == checkpoint.fingerprint(before)
  c['train']['augment'] = 'symmetries'
  assert checkpoint.fingerprint(c) != checkpoint.fingerprint(before)
