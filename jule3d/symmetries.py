"""The 48 symmetries of the cube, applied to training patches (config.train.augment).

A tissue region is the same region seen from any side: a patch turned by a right angle or mirrored
through a face is another patch of the same tissue. Drawing one of these 48 transforms per patch
and per SGD step (the 6 orders of the three axes times the 8 sign flips) teaches the CNN that its
cluster label does not depend on the patch's orientation, so its features keep what the tissue
is (texture, level) rather than where its neighbours lie. The patch stays a cube with the same
centre voxel, so the label stays true; nothing else of the patch changes.

Each transform is a permutation of the w^3 voxels, gathered per patch on the device: one compiled
step serves every draw. Element 0 is the identity.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

NUM = 48


@functools.lru_cache(maxsize=8)
def index_table(w: int) -> np.ndarray:
  """[48, w^3] int32: row g lists, for each output voxel, the input voxel it takes (row 0 = identity).

  Args:
    w: patch edge.

  Returns:
    The gather indices of the flattened [w, w, w] patch under each symmetry.
  """
  ids = np.arange(w**3, dtype=np.int32).reshape(w, w, w)
  rows = []
  for order in itertools.permutations(range(3)):
    for flips in itertools.product((False, True), repeat=3):
      t = np.transpose(ids, order)
      t = np.flip(t, [a for a in range(3) if flips[a]]) if any(flips) else t
      rows.append(t.reshape(-1))
  table = np.stack(rows)
  table.setflags(write=False)  # cached: shared by every caller
  return table


def apply(patches: jax.Array, which: jax.Array) -> jax.Array:
  """Each patch under its own symmetry.

  Args:
    patches: [B, w, w, w].
    which: [B] int32 in [0, 48): the symmetry of each patch.

  Returns:
    [B, w, w, w], patch b transformed by symmetry which[b].
  """
  b, w = patches.shape[0], patches.shape[1]
  table = jnp.asarray(index_table(w))
  flat = patches.reshape(b, -1)
  return jnp.take_along_axis(flat, table[which], axis=1).reshape(patches.shape)


def draw(rng: jax.Array, batch_size: int) -> jax.Array:
  """[batch_size] int32 symmetries, uniform over the 48, from a raw or typed key."""
  return jax.random.randint(rng, (batch_size,), 0, NUM, dtype=jnp.int32)
