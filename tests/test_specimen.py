"""Outside-the-specimen masking: the air around the specimen goes, enclosed air and tissue stay."""

import numpy as np
import pytest

from jule3d import grid, patches, specimen, volume

AIR, TISSUE, THRESHOLD = 1000, 3000, 2000


@pytest.fixture(scope='module')
def ball(tmp_path_factory):
  """A tissue ball in air, with an enclosed air cavity and a 1-voxel channel onto its surface."""
  n = 40
  z, y, x = np.ogrid[:n, :n, :n]
  r = np.sqrt((z - 20.0) ** 2 + (y - 21.0) ** 2 + (x - 19.0) ** 2)
  image = np.full((n, n, n), AIR, np.uint16)
  image[r <= 13] = TISSUE
  cavity = r <= 4
  image[cavity] = AIR
  image[20, 21, 19:33] = AIR  # from the cavity out through the surface, narrower than a block
  path = str(tmp_path_factory.mktemp('ball') / 'ball.zarr')
  volume.save_zarr(path, image, (0.5, 0.5, 0.5))
  return volume.open_volume(path), image, cavity, r


def test_outside_filled_tissue_and_enclosed_air_kept(ball, tmp_path):
  vol, image, cavity, r = ball
  masked = specimen.masked_volume(vol, THRESHOLD, 'above', 4, str(tmp_path))
  out = masked.read((0, 0, 0), masked.shape)
  assert (masked.shape, masked.dtype, masked.spacing) == (vol.shape, vol.dtype, vol.spacing)
  near, fill = specimen.coarse_outside(vol, THRESHOLD, 'above', 4)
  fill = int(np.rint(fill))
  tissue = image >= THRESHOLD
  np.testing.assert_array_equal(out[tissue], image[tissue])  # foreground never changes
  assert np.all(out[cavity] == AIR)  # enclosed air is texture, not outside
  far = r >= 13 + 2 * 4 * np.sqrt(3)  # two blocks away from the surface: surely outside
  assert np.all(out[far] == fill)
  assert np.all((out[r > 13] == fill) | (out[r > 13] == AIR))  # only outside air was touched
  # The fill is the mean of the blocks away from the outside (the specimen's own intensity).
  up = near.repeat(4, 0).repeat(4, 1).repeat(4, 2)[:40, :40, :40]
  assert fill == int(np.rint(image[~up].mean()))
  assert AIR < fill <= TISSUE


def test_below_direction_masks_the_bright_surroundings(tmp_path):
  image = np.full((24, 24, 24), 3000, np.int16)
  image[
    6:18, 5:19, 6:18
  ] = -500  # a dark specimen (foreground: <= threshold) in bright surroundings
  volume.save_zarr(str(tmp_path / 'v.zarr'), image, (1, 1, 1))
  vol = volume.open_volume(str(tmp_path / 'v.zarr'))
  masked = specimen.masked_volume(vol, 0.0, 'below', 2, str(tmp_path / 'cache'))
  out = masked.read((0, 0, 0), masked.shape)
  assert np.all(out[6:18, 5:19, 6:18] == -500) and np.all(out[0] == -500)


@pytest.fixture(scope='module')
def slab_specimen(tmp_path_factory):
  """Textured tissue in planes z < 12, air above: the surface is the plane z = 11.5."""
  rng = np.random.default_rng(0)
  image = np.full((32, 9, 10), AIR, np.uint16)
  image[:12] = TISSUE + rng.integers(-500, 500, (12, 9, 10))
  path = str(tmp_path_factory.mktemp('slab') / 'slab.zarr')
  volume.save_zarr(path, image, (1, 1, 1))
  return volume.open_volume(path), image


def test_mirror_fill_reflects_the_tissue_through_its_surface(slab_specimen, tmp_path):
  vol, image = slab_specimen
  masked = specimen.masked_volume(
    vol, THRESHOLD, 'above', 4, str(tmp_path), fill_mode='mirror', reach=9
  )
  out = masked.read((0, 0, 0), masked.shape)
  np.testing.assert_array_equal(out[:12], image[:12])
  # Planes within reach / 2 of the tissue mirror it through its last plane (11): 12 <- 10, 13 <- 9.
  np.testing.assert_array_equal(out[12:16], image[10:6:-1])
  fill = int(np.rint(specimen.coarse_outside(vol, THRESHOLD, 'above', 4)[1]))
  assert np.all(out[16:] == fill)  # no patch centred in the tissue reaches these
  # The mirror keeps the texture's contrast up to the surface; the mean fill flattens it.
  mean = specimen.masked_volume(vol, THRESHOLD, 'above', 4, str(tmp_path), fill_mode='mean')
  assert np.all(mean.read((12, 0, 0), (16, 9, 10)) == fill)
  assert out[12:16].std() > 0.9 * image[:12].std()


def test_mirror_fill_is_the_same_slab_by_slab(ball, tmp_path, monkeypatch):
  vol = ball[0]
  whole = specimen.masked_volume(
    vol, THRESHOLD, 'above', 4, str(tmp_path / 'a'), fill_mode='mirror', reach=11
  )
  monkeypatch.setattr(specimen, '_slab_depth', lambda *a: 4)  # ten slabs, each with its halo
  slabs = specimen.masked_volume(
    vol, THRESHOLD, 'above', 4, str(tmp_path / 'b'), fill_mode='mirror', reach=11
  )
  a, b = (v.read((0, 0, 0), v.shape) for v in (whole, slabs))
  np.testing.assert_array_equal(a, b)
  assert np.any(a[ball[3] > 13] == TISSUE)  # the surface's mirror image lies outside it


def test_cached_once_and_keyed_by_the_settings(ball, tmp_path, monkeypatch):
  vol = ball[0]
  first = specimen.masked_volume(vol, THRESHOLD, 'above', 4, str(tmp_path))
  monkeypatch.setattr(specimen, 'coarse_outside', lambda *a: pytest.fail('recomputed'))
  assert specimen.masked_volume(vol, THRESHOLD, 'above', 4, str(tmp_path)).path == first.path
  monkeypatch.undo()
  other = specimen.masked_volume(vol, THRESHOLD, 'above', 2, str(tmp_path))
  assert other.path != first.path
  assert len(list(tmp_path.iterdir())) == 2


def test_pipeline_reads_training_patches_from_the_masked_copy(tmp_path):
  from configs import smoke
  from jule3d import pipeline, samples

  c = smoke.get_config()
  c.patches.mask_outside = True
  c.patches.domain = 'foreground'  # masking alone (the 'specimen' domain is tested above)
  inputs = pipeline.resolve_inputs(c, str(tmp_path / 'w'), for_training=True)
  assert inputs.patch_source is inputs.content and inputs.content.path != inputs.image.path
  data = samples.load_training_data(inputs)
  raw = patches.read_patches(inputs.content, data.centres, c.patches.patch_size)
  np.testing.assert_allclose(np.asarray(data.patches), (raw - data.mean) / data.std, atol=1e-5)
  # The centres are still the image's foreground, and the copy differs from the image only where
  # the image is not foreground.
  image = inputs.image.read((0, 0, 0), inputs.image.shape)
  content = inputs.content.read((0, 0, 0), inputs.image.shape)
  fg = patches.foreground(image, c.data.threshold, c.data.foreground)
  assert np.all(fg[tuple(data.centres.T)])
  np.testing.assert_array_equal(content[fg], image[fg])
  assert np.any(content[~fg] != image[~fg])


def test_specimen_domain_holds_the_enclosed_air_not_the_outside(ball):
  vol, image, cavity, r = ball
  interior = specimen.interior(vol, THRESHOLD, 'above', 4)
  n = image.shape[0]
  dom = patches.in_domain(image, THRESHOLD, 'above', interior, (np.arange(n),) * 3)
  tissue = image >= THRESHOLD
  assert np.all(dom[tissue]) and np.all(dom[cavity])
  assert not dom[r >= 13 + 2 * 4 * np.sqrt(3)].any()
  # The grid and the training samples of the 'specimen' domain reach into the cavity.
  w = 9
  domain_grid = grid.centres(vol, w, 1, THRESHOLD, 'above', interior=interior)
  plain = grid.centres(vol, w, 1, THRESHOLD, 'above')
  in_cavity = cavity[tuple(domain_grid.T)]
  assert in_cavity.sum() == cavity.sum() and not cavity[tuple(plain.T)].any()
  assert len(domain_grid) == len(plain) + int(np.count_nonzero(dom & ~tissue & _centre_box(n, w)))
  counts = patches.count_foreground_centres(vol, w, THRESHOLD, 'above', interior=interior)
  assert counts.sum() == len(domain_grid)
  picked = patches.sample_centres(
    vol, len(domain_grid), w, THRESHOLD, 'above', 0, interior=interior
  )
  np.testing.assert_array_equal(np.unique(picked, axis=0), np.unique(domain_grid, axis=0))


def _centre_box(n, w):
  box = np.zeros((n, n, n), bool)
  h = w // 2
  box[h : n - h, h : n - h, h : n - h] = True
  return box


@pytest.fixture(scope='module')
def pored(tmp_path_factory):
  """A tissue ball with a narrow pore and a wide notch open onto its surface."""
  n, c = 48, 24
  z, y, x = np.ogrid[:n, :n, :n]
  image = np.full((n, n, n), AIR, np.uint16)
  image[(z - c) ** 2 + (y - c) ** 2 + (x - c) ** 2 <= 16**2] = TISSUE
  pore = ((z - c) ** 2 + (y - c) ** 2 <= 2.5**2) & (x <= 13) & (image == TISSUE)  # 5 wide
  notch = ((y - c) ** 2 + (x - c) ** 2 <= 6**2) & (z >= 34) & (image == TISSUE)  # 13 wide
  image[pore | notch] = AIR
  path = str(tmp_path_factory.mktemp('pored') / 'pored.zarr')
  volume.save_zarr(path, image, (1, 1, 1))
  # The pore but for its mouth (the outer two voxels), where a ball outside the specimen dips in.
  deep = pore & (np.sqrt((z - c) ** 2 + (y - c) ** 2 + (x - c) ** 2) <= 13.5)
  return volume.open_volume(path), image, pore, notch, deep


def test_envelope_holds_pores_narrower_than_the_ball(pored):
  vol, image, pore, notch, deep = pored
  coords = (np.arange(image.shape[0]),) * 3
  plain = specimen.interior(vol, THRESHOLD, 'above', 4)
  inner = specimen.interior(vol, THRESHOLD, 'above', 4, envelope=True)
  dom = patches.in_domain(image, THRESHOLD, 'above', inner, coords)
  env = patches.in_domain(image, THRESHOLD, 'above', inner, coords, envelope=True)
  # Patch centres keep the band rule; the envelope is only where labels go.
  np.testing.assert_array_equal(dom, patches.in_domain(image, THRESHOLD, 'above', plain, coords))
  np.testing.assert_array_equal(
    patches.in_domain(image, THRESHOLD, 'above', plain, coords, envelope=True), dom
  )
  # The band leaves most of the pore out; the closing (a ball of radius 4, 9 voxels across) does
  # not fit in it, so it is in the envelope but for its mouth.
  assert dom[pore].mean() < 0.5 and env[deep].all()
  assert env[pore].mean() > 0.75
  # A notch wider than the ball stays outside along its axis, and so does the air around the ball.
  axis = np.zeros_like(notch)
  axis[37:41, 24, 24] = True
  assert not env[axis].any() and not dom[axis].any()
  assert not env[0].any() and not env[:, :, -3:].any()
  # Only band air changes: the envelope adds to the domain, never removes from it.
  assert np.all(env[dom]) and np.all(env[image >= THRESHOLD])


def test_envelope_is_the_same_slab_by_slab(pored, monkeypatch):
  vol = pored[0]
  whole = specimen.interior(vol, THRESHOLD, 'above', 4, envelope=True).open_bits
  monkeypatch.setattr(specimen, '_slab_depth', lambda *a: 4)  # twelve slabs, each with its halo
  np.testing.assert_array_equal(
    specimen.interior(vol, THRESHOLD, 'above', 4, envelope=True).open_bits, whole
  )
  assert whole.any()


def test_envelope_is_computed_once_per_cache(pored, tmp_path, monkeypatch):
  vol = pored[0]
  first = specimen.interior(vol, THRESHOLD, 'above', 4, True, str(tmp_path))
  assert [p.suffix for p in tmp_path.iterdir()] == ['.npy']
  monkeypatch.setattr(specimen, '_closing_rows', lambda *a: pytest.fail('recomputed'))
  again = specimen.interior(vol, THRESHOLD, 'above', 4, True, str(tmp_path))
  np.testing.assert_array_equal(again.open_bits, first.open_bits)
  with pytest.raises(pytest.fail.Exception, match='recomputed'):  # another block, another key
    specimen.interior(vol, THRESHOLD, 'above', 2, True, str(tmp_path))


def test_fill_labels_the_envelope_and_coverage_counts_it(pored, tmp_path):
  from configs import smoke
  from jule3d import evaluate, pipeline, segment

  vol, image, pore, notch, deep = pored
  c = smoke.get_config()
  c.data.threshold, c.patches.domain, c.segment.fill = float(THRESHOLD), 'specimen', True
  tissue = image >= THRESHOLD
  centres = np.argwhere(tissue)  # every tissue voxel a grid centre, label 1 + (x >= 24)
  labels = 1 + (centres[:, 2] >= 24).astype(np.int64)
  got = {}
  for envelope in (False, True):
    inner = specimen.interior(vol, THRESHOLD, 'above', 4, envelope=envelope)
    inputs = pipeline.Inputs(config=c, image=vol, labels=None, interior=inner)
    path = str(tmp_path / f'seg{envelope}.zarr')
    with volume.zarr_writer(path, image.shape, np.uint8, (1, 1, 1)) as store:
      segment.write_labels(store, inputs, centres, labels, 1)
    got[envelope] = volume.open_volume(path).read((0, 0, 0), image.shape)
    cover = evaluate.summarise(inputs, {'jule3d': got[envelope]})['coverage']
    assert cover['labelled_fraction'] == 1.0  # every voxel that must be labelled is
    assert cover['foreground_voxels'] == int(
      patches.in_domain(image, THRESHOLD, 'above', inner, (np.arange(48),) * 3, True).sum()
    )
  # The pore (x < 24) takes its tissue's label with the envelope; without, most of it stays 0.
  assert np.all(got[True][deep] == 1) and (got[False][pore] == 0).mean() > 0.5
  np.testing.assert_array_equal(got[True][tissue], got[False][tissue])
  assert not got[True][0].any()  # no outside air labelled
