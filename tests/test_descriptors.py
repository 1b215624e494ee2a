"""Period-0 features: the paper's L2 input is scale-invariant, the windowed and texture ones are not."""

import jax.numpy as jnp
import numpy as np
import pytest

from jule3d import descriptors


@pytest.fixture(scope='module')
def patches():
  rng = np.random.default_rng(0)
  return rng.normal(size=(6, 9, 9, 9)).astype(np.float32)


def test_raw_divides_out_the_scale_and_windowed_keeps_it(patches):
  x = jnp.asarray(patches)
  np.testing.assert_allclose(descriptors.raw(2 * x), descriptors.raw(x), atol=1e-6)
  np.testing.assert_allclose(descriptors.windowed(2 * x), 2 * descriptors.windowed(x), rtol=1e-5)
  # The window weights the centre voxel most.
  w = np.asarray(descriptors.windowed(jnp.ones((1, 9, 9, 9)))).reshape(9, 9, 9)
  assert w[4, 4, 4] == pytest.approx(1.0) and w[0, 0, 0] < 0.05


def test_texture_level_and_energy(patches):
  x = jnp.asarray(patches)
  t = np.asarray(descriptors.texture_raw(x))
  assert t.shape == (6, 3)
  const = np.asarray(descriptors.texture_raw(jnp.full((1, 9, 9, 9), 3.0)))
  np.testing.assert_allclose(const[0], [3.0, 0.0, 0.0], atol=1e-3)
  # Energy: invariant to an added constant, linear in contrast; the level follows the constant.
  shifted = np.asarray(descriptors.texture_raw(x + 5.0))
  np.testing.assert_allclose(shifted[:, 1:], t[:, 1:], rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(shifted[:, 0], t[:, 0] + 5.0, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(
    np.asarray(descriptors.texture_raw(3 * x))[:, 1:], 3 * t[:, 1:], rtol=1e-4
  )


def test_texture_is_phase_invariant():
  # The same random texture, translated: raw voxels decorrelate, the energies stay close.
  rng = np.random.default_rng(1)
  field = rng.normal(size=(40, 40, 40)).astype(np.float32)
  a, b = field[5:14, 5:14, 5:14], field[20:29, 21:30, 19:28]
  rough = 3 * rng.normal(size=(9, 9, 9)).astype(np.float32)
  t = np.asarray(descriptors.texture_raw(jnp.asarray(np.stack([a, b, rough]))))
  assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.2
  same, other = abs(t[0, 2] - t[1, 2]), abs(t[0, 2] - t[2, 2])
  assert same < other / 3


def test_initial_features_dispatch_and_standardise(patches):
  f = descriptors.initial_features('texture', jnp.asarray(patches))
  np.testing.assert_allclose(f.mean(axis=0), 0, atol=1e-5)
  np.testing.assert_allclose(f.std(axis=0), 1, atol=1e-4)
  assert descriptors.initial_features('raw', jnp.asarray(patches)).shape == (6, 729)
  with pytest.raises(ValueError, match='unknown'):
    descriptors.initial_features('nope', jnp.asarray(patches))


@pytest.mark.parametrize(
  'kind, w, centres',
  [
    ('texture', 9, [[4, 4, 4], [10, 9, 12], [15, 13, 14]]),
    ('cue', 15, [[7, 7, 7], [9, 8, 11], [12, 10, 11]]),
  ],
)
def test_volume_descriptor_equals_the_per_patch_one(kind, w, centres):
  rng = np.random.default_rng(2)
  vol = rng.normal(size=(20, 18, 19)).astype(np.float32)
  full = descriptors.volume_function(kind)(vol, w)
  of_patches = descriptors.function(kind)
  centres = np.array(centres)
  h = w // 2
  patches = np.stack(
    [vol[z - h : z + h + 1, y - h : y + h + 1, x - h : x + h + 1] for z, y, x in centres]
  )
  want = np.asarray(of_patches(jnp.asarray(patches)))
  np.testing.assert_allclose(full[tuple(centres.T)], want, rtol=2e-4, atol=2e-4)


def test_cue_energy_is_a_fine_texture_not_a_level_step():
  # A level step in the window, off the centre (a region edge), has little fine energy where
  # the pooling looks; a fine texture has.
  w = 15
  step = np.zeros((1, w, w, w), np.float32)
  step[:, :, :, w // 2 + 4 :] = 4.0
  texture = np.random.default_rng(4).normal(size=(1, w, w, w)).astype(np.float32)
  cue = np.asarray(descriptors.cue_raw(jnp.asarray(np.concatenate([step, texture]))))
  coarse = np.asarray(descriptors.texture_raw(jnp.asarray(step)))[0, 2]
  assert cue[0, 1] < 0.5 * coarse  # the whole-window std reads the step as texture
  assert cue[1, 1] > 2 * cue[0, 1]
  # Energy: invariant to an added constant, linear in contrast.
  shifted = np.asarray(descriptors.cue_raw(jnp.asarray(texture + 5.0)))
  np.testing.assert_allclose(shifted[0, 1], cue[1, 1], rtol=1e-3)
  np.testing.assert_allclose(shifted[0, 0], cue[1, 0] + 5.0, rtol=1e-4)


def test_pick_cue_takes_the_column_that_forms_k_groups():
  rng = np.random.default_rng(5)
  groups = rng.choice([-3.0, 0.0, 3.0], 3000) + 0.3 * rng.normal(size=3000)
  noise = rng.normal(size=3000)
  assert descriptors.pick_cue(np.stack([noise, groups], 1), 3)[0] == 1
  assert descriptors.pick_cue(np.stack([groups, noise], 1), 3)[0] == 0
  assert descriptors.unexplained(groups, 3) < 0.05 < 0.1 < descriptors.unexplained(noise, 3)
  # finish('cue') keeps that one column, standardised.
  f = descriptors.finish('cue', np.stack([noise, 5 * groups + 2], 1), 3)
  assert f.shape == (3000, 1)
  np.testing.assert_allclose(f[:, 0], (groups - groups.mean()) / groups.std(), atol=1e-4)
