"""The built-in phantom: determinism, geometry, the intensity/texture design claims, the writers."""

import json
import os

import numpy as np
import pytest
from scipy import ndimage
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

from jule3d import phantom
from jule3d.errors import UserError

THR = phantom.THRESHOLD


@pytest.fixture(scope='module')
def small():
  return phantom.make_phantom((64, 64, 64), 0)


@pytest.fixture(scope='module')
def demo():
  # configs/demo.py's phantom: the separability claim is checked on the data the demo runs on.
  return phantom.make_phantom((96, 96, 96), 0)


def _nmi(truth, pred):
  return normalized_mutual_info_score(truth, pred, average_method='geometric')


def test_deterministic_seeded_odd_shape():
  shape = (41, 36, 47)
  image, labels = phantom.make_phantom(shape, 3)
  assert image.shape == labels.shape == shape
  assert image.dtype == np.uint16 and labels.dtype == np.uint8
  again = phantom.make_phantom(shape, 3)
  np.testing.assert_array_equal(image, again[0])
  np.testing.assert_array_equal(labels, again[1])
  other_image, other_labels = phantom.make_phantom(shape, 4)
  assert not np.array_equal(image, other_image) and not np.array_equal(labels, other_labels)
  # A knob changes its own component only: same specimen and regions, other intensities.
  noisier, same_labels = phantom.make_phantom(shape, 3, noise_std=200.0)
  np.testing.assert_array_equal(labels, same_labels)
  assert not np.array_equal(image, noisier)


@pytest.mark.parametrize('shape', [(64, 64, 64), (33, 47, 61)])
def test_labels_regions_contiguous_with_substantial_shares(shape):
  _, labels = phantom.make_phantom(shape, 1)
  assert set(np.unique(labels)) == {0, 1, 2, 3}
  specimen = labels > 0
  assert 0.15 < specimen.mean() < 0.6
  # Air all around: the specimen never touches a face of the volume.
  for axis in range(3):
    assert not np.take(specimen, [0, -1], axis=axis).any()
  assert ndimage.label(specimen)[1] == 1
  for k in (1, 2, 3):
    region = labels == k
    assert 0.2 <= region.sum() / specimen.sum() <= 0.55
    components, count = ndimage.label(region)
    largest = np.bincount(components.ravel())[1:].max()
    assert largest >= 0.9 * region.sum(), f'class {k} is fragmented into {count} pieces'


def test_threshold_separates_air_from_tissue(small):
  image, labels = small
  specimen = labels > 0
  # Outside air, beyond the PSF's reach of the specimen, is all below the threshold.
  far_air = ~ndimage.binary_dilation(specimen, iterations=2)
  assert far_air.sum() > 0.3 * image.size
  assert image[far_air].max() < THR
  fg = image >= THR
  assert fg[specimen].mean() > 0.75
  for k in (1, 2, 3):
    assert fg[labels == k].mean() > 0.6
  # Alveolar air inside the specimen is as dark as outside air (within 3 noise stds of its
  # median): a threshold keeps only the walls of normal tissue.
  air_like = image < np.median(image[far_air]) + 3 * phantom.PhantomParams().noise_std
  assert air_like[labels == 1].mean() > 0.05


@pytest.mark.parametrize('fixture', ['small', 'demo'])
def test_equal_mean_intensity_different_local_variance(fixture, request):
  image, labels = request.getfixturevalue(fixture)
  img = image.astype(np.float64)
  fg = img >= THR
  mean_all = [img[labels == k].mean() for k in (1, 2, 3)]
  mean_fg = [img[(labels == k) & fg].mean() for k in (1, 2, 3)]
  assert max(mean_all) / min(mean_all) < 1.10, mean_all
  assert max(mean_fg) / min(mean_fg) < 1.10, mean_fg
  # Std in 7^3 windows lying wholly inside one region (interior: eroded by 3 voxels).
  mean = ndimage.uniform_filter(img, 7)
  local_std = np.sqrt(np.maximum(ndimage.uniform_filter(img * img, 7) - mean * mean, 0))
  interior = [ndimage.binary_erosion(labels == k, iterations=3) for k in (1, 2, 3)]
  std = [local_std[m].mean() for m in interior]
  assert std[0] > 1.4 * std[1] and std[1] > 1.4 * std[2], std
  # region_statistics reports the same quantities.
  stats = phantom.region_statistics(image, labels)
  np.testing.assert_allclose([stats[k]['mean_all'] for k in (1, 2, 3)], mean_all, rtol=1e-5)
  np.testing.assert_allclose([stats[k]['mean_foreground'] for k in (1, 2, 3)], mean_fg, rtol=1e-5)
  assert stats[1]['local_std'] > stats[2]['local_std'] > stats[3]['local_std']


def test_intensity_cannot_separate_regions_texture_can(demo):
  from skimage.filters import threshold_multiotsu

  image, labels = demo
  img = image.astype(np.float64)
  where = np.flatnonzero((img >= THR) & (labels > 0))
  where = np.sort(np.random.default_rng(0).choice(where, 40_000, replace=False))
  truth = labels.ravel()[where]
  x = img.ravel()[where]
  kmeans = KMeans(3, n_init=4, random_state=0).fit_predict(x[:, None])
  otsu = np.digitize(x, threshold_multiotsu(x, classes=3))
  tex = phantom.texture_feature(image).ravel()[where].astype(np.float64)
  texture = KMeans(3, n_init=4, random_state=0).fit_predict(tex[:, None])
  nmi_kmeans, nmi_otsu, nmi_texture = _nmi(truth, kmeans), _nmi(truth, otsu), _nmi(truth, texture)
  assert nmi_kmeans < 0.3 and nmi_otsu < 0.3, (nmi_kmeans, nmi_otsu)
  assert nmi_texture > 0.5 and nmi_texture > nmi_kmeans + 0.3, (nmi_texture, nmi_kmeans)
  # The packaged measurement agrees with the one above (same definition, another subsample).
  sep = phantom.separability(image, labels, max_voxels=40_000, seed=1)
  assert abs(sep['intensity_nmi'] - nmi_kmeans) < 0.05
  assert abs(sep['texture_nmi'] - nmi_texture) < 0.05


@pytest.mark.parametrize('axis', [0, 1, 2])
def test_annotate_slices_keeps_seven_inner_evenly_spaced_slices(axis):
  rng = np.random.default_rng(0)
  labels = rng.integers(1, 4, size=(30, 25, 41)).astype(np.uint8)
  out = phantom.annotate_slices(labels, axis=axis)
  assert out.shape == labels.shape and out.dtype == labels.dtype
  kept = np.flatnonzero(np.moveaxis(out, axis, 0).reshape(labels.shape[axis], -1).any(axis=1))
  assert len(kept) == 7
  assert kept[0] > 0 and kept[-1] < labels.shape[axis] - 1
  gaps = np.diff(np.r_[0, kept, labels.shape[axis] - 1])
  assert gaps.max() - gaps.min() <= 1
  index = [slice(None)] * 3
  index[axis] = kept
  np.testing.assert_array_equal(out[tuple(index)], labels[tuple(index)])
  assert out.sum() == labels[tuple(index)].sum()
  np.testing.assert_array_equal(phantom.annotation_positions(labels.shape[axis]), kept)


def test_annotate_slices_rejects_bad_input():
  with pytest.raises(UserError, match='num_slices'):
    phantom.annotate_slices(np.ones((8, 9, 9), np.uint8))
  with pytest.raises(UserError, match='axis'):
    phantom.annotate_slices(np.ones((9, 9, 9), np.uint8), axis=3)
  with pytest.raises(UserError, match='3D'):
    phantom.annotate_slices(np.ones((9, 9), np.uint8))


@pytest.mark.parametrize(
  'shape, seed, knobs, match',
  [
    ((16, 64, 64), 0, {}, 'shape'),
    ((64, 64), 0, {}, 'shape'),
    ((64.5, 64, 64), 0, {}, 'shape'),
    ((64, 64, 64), -1, {}, 'seed'),
    ((64, 64, 64), 0, {'cell': 9.0}, 'unknown'),
    ((64, 64, 64), 0, {'fill_level': 1.5}, 'fill_level'),
    ((64, 64, 64), 0, {'region_mean_ratio': (1.0, 1.0)}, 'region_mean_ratio'),
  ],
)
def test_make_phantom_rejects_bad_input(shape, seed, knobs, match):
  with pytest.raises(UserError, match=match):
    phantom.make_phantom(shape, seed, **knobs)


def _save_zarr_available():
  try:
    from jule3d import volume
  except ImportError:
    return False
  return hasattr(volume, 'save_zarr') and hasattr(volume, 'open_volume')


needs_volume = pytest.mark.skipif(
  not _save_zarr_available(), reason='jule3d.volume.save_zarr not available yet'
)


def _read(path):
  from jule3d import volume

  v = volume.open_volume(path)
  return v.read((0, 0, 0), v.shape), v.spacing


@needs_volume
def test_write_phantom_writes_reads_back_and_skips_when_current(tmp_path, monkeypatch):
  shape, spacing = (32, 30, 34), (0.03, 0.025, 0.03)
  out = str(tmp_path / 'ph')
  paths = phantom.write_phantom(out, shape, 2, spacing=spacing)
  image, labels = phantom.make_phantom(shape, 2)
  for name, want in (
    ('image', image),
    ('labels', labels),
    ('labels_annotated', phantom.annotate_slices(labels)),
  ):
    got, got_spacing = _read(paths[name])
    np.testing.assert_array_equal(got, want)
    assert got.dtype == want.dtype
    np.testing.assert_allclose(got_spacing, spacing)
  with open(paths['meta']) as f:
    meta = json.load(f)
  assert meta['shape'] == list(shape) and meta['seed'] == 2 and meta['threshold'] == THR

  def fail(*args, **kwargs):
    raise AssertionError('regenerated although the outputs are current')

  with monkeypatch.context() as m:
    m.setattr(phantom.store, 'make_phantom', fail)
    assert phantom.write_phantom(out, shape, 2, spacing=spacing) == paths
  # Another seed, or a missing store, regenerates.
  phantom.write_phantom(out, shape, 3, spacing=spacing)
  np.testing.assert_array_equal(_read(paths['labels'])[0], phantom.make_phantom(shape, 3)[1])
  os.rename(paths['labels'], paths['labels'] + '.gone')
  phantom.write_phantom(out, shape, 3, spacing=spacing)
  assert os.path.isdir(paths['labels'])


@needs_volume
def test_cli_writes_and_reports_errors(tmp_path, capsys):
  out = str(tmp_path / 'cli')
  assert phantom.main(['--out', out, '--shape', '32,33,34', '--seed', '1']) == 0
  printed = json.loads(capsys.readouterr().out)
  assert set(printed) == {'image', 'labels', 'labels_annotated', 'meta'}
  assert all(os.path.exists(p) for p in printed.values())
  assert phantom.main(['--out', out, '--shape', '32,33']) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: --shape') and len(err.strip().splitlines()) == 1
  assert phantom.main(['--out', out, '--shape', '8,33,34']) == 2
  assert 'shape' in capsys.readouterr().err
