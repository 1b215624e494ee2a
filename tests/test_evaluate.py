"""Evaluation (method §6): NMI against sklearn, matched Dice, intensity baselines, the report."""

import json
import os

import numpy as np
import pytest
from skimage.filters import threshold_multiotsu
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

from configs import base
from jule3d import atropos, baselines, evaluate, phantom, pipeline, scores, volume
from jule3d.errors import UserError

SHAPE = (12, 9, 7)


def _sk_nmi(ref, pred):
  keep = ref > 0
  return normalized_mutual_info_score(ref[keep], pred[keep], average_method='geometric')


def _save(path, array, spacing=(1.0, 1.0, 1.0)):
  volume.save_zarr(str(path), array, spacing, chunk=4)
  return volume.open_volume(str(path))


@pytest.mark.parametrize('seed', [0, 1, 2, 3])
def test_nmi_equals_sklearn_on_annotated_voxels_and_streaming_equals_whole(seed):
  rng = np.random.default_rng(seed)
  ref = rng.integers(0, 4, SHAPE)  # 0 = not annotated
  pred = rng.integers(0, 5, SHAPE)  # 0 = not covered
  pred[ref == 2] = rng.integers(0, 2, (ref == 2).sum())  # some dependence: NMI not ~0
  whole = scores.contingency(ref, pred, slab_depth=SHAPE[0])
  assert whole.total == (ref > 0).sum()
  np.testing.assert_allclose(scores.nmi(whole), _sk_nmi(ref, pred), rtol=1e-12, atol=1e-15)
  np.testing.assert_array_equal(whole.planes, (ref > 0).sum(axis=(1, 2)))
  for depth in (1, 2, 5):
    t = scores.contingency(ref, pred, slab_depth=depth)
    np.testing.assert_array_equal(t.table, whole.table)
    np.testing.assert_array_equal(t.predicted_labels, whole.predicted_labels)


def test_contingency_of_volumes_equals_arrays(tmp_path):
  rng = np.random.default_rng(5)
  ref = rng.integers(0, 3, SHAPE).astype(np.uint16)
  ref[3:6] = 0  # whole slabs with no annotation are skipped
  pred = rng.integers(0, 4, SHAPE).astype(np.uint8)
  vols = scores.contingencies(
    _save(tmp_path / 'r.zarr', ref), {'p': _save(tmp_path / 'p.zarr', pred)}, slab_depth=2
  )['p']
  arrays = scores.contingency(ref, pred)
  np.testing.assert_array_equal(vols.table, arrays.table)
  np.testing.assert_array_equal(vols.reference_labels, [1, 2])
  np.testing.assert_allclose(scores.nmi(vols), _sk_nmi(ref, pred), rtol=1e-12)


def test_large_label_values_use_the_sparse_path():
  ref = np.array([[[5000, 5000, 70000, 70000, 0]]], np.int64)
  pred = np.array([[[200, 200, 3, 3, 200]]], np.uint8)
  t = scores.contingency(ref, pred)
  np.testing.assert_array_equal(t.reference_labels, [5000, 70000])
  np.testing.assert_array_equal(t.table, [[0, 2], [2, 0]])
  assert scores.nmi(t) == pytest.approx(1.0)


@pytest.mark.parametrize(
  'ref, pred',
  [
    ([1, 1, 1, 1], [2, 2, 2, 2]),  # one class, one cluster: sklearn says 1.0
    ([1, 1, 1, 1], [1, 2, 1, 2]),  # one class: 0.0
    ([1, 2, 1, 2], [3, 3, 3, 3]),  # one predicted cluster: 0.0
    ([1, 1, 2, 2], [1, 2, 1, 2]),  # independent: MI exactly 0
    ([1, 1, 2, 2], [7, 7, 4, 4]),  # a relabelling: 1.0
    ([1, 2, 3, 3, 2, 1], [1, 1, 2, 2, 0, 0]),
  ],
)
def test_nmi_degenerate_cases_match_sklearn(ref, pred):
  ref, pred = np.array(ref).reshape(-1, 1, 1), np.array(pred).reshape(-1, 1, 1)
  got = scores.nmi(scores.contingency(ref, pred))
  assert got == pytest.approx(_sk_nmi(ref, pred), abs=1e-12)


def test_nmi_of_no_annotated_voxel_is_sklearns_one():
  zeros = np.zeros((2, 2, 2), np.uint8)
  t = scores.contingency(zeros, zeros)
  assert t.total == 0
  assert scores.nmi(t) == normalized_mutual_info_score([], [], average_method='geometric')


def test_prediction_zero_is_its_own_cluster():
  ref = np.array([1, 1, 2, 2, 2, 2]).reshape(-1, 1, 1)
  pred = np.array([0, 0, 1, 1, 1, 1]).reshape(-1, 1, 1)  # class 1 left uncovered, class 2 found
  t = scores.contingency(ref, pred)
  np.testing.assert_array_equal(t.predicted_labels, [0, 1])
  assert scores.nmi(t) == pytest.approx(1.0)  # ignoring 0 would leave one cluster: NMI 0
  pred[0] = 1  # a covered voxel in the wrong cluster costs NMI, as in sklearn with 0 as a label
  t = scores.contingency(ref, pred)
  assert scores.nmi(t) == pytest.approx(_sk_nmi(ref, pred))
  assert scores.nmi(t) < 1.0


def test_dice_table_finds_a_permutation():
  ref = np.repeat([1, 2, 3], 4).reshape(-1, 1, 1)
  perm = {1: 3, 2: 1, 3: 2}
  pred = np.vectorize(perm.get)(ref)
  rows = scores.dice_table(scores.contingency(ref, pred), {3: 'tumour'})
  assert [(r['class'], r['label'], r['dice']) for r in rows] == [
    (1, 3, 1.0),
    (2, 1, 1.0),
    (3, 2, 1.0),
  ]
  assert rows[2]['name'] == 'tumour' and rows[0]['name'] == 'class 1'
  assert [r['voxels'] for r in rows] == [4, 4, 4]


def test_dice_table_hand_computed_and_zero_never_matched():
  ref = np.array([1, 1, 1, 1, 2, 2]).reshape(-1, 1, 1)
  pred = np.array([5, 5, 5, 7, 7, 7]).reshape(-1, 1, 1)
  rows = scores.dice_table(scores.contingency(ref, pred))
  assert [r['label'] for r in rows] == [5, 7]
  assert rows[0]['dice'] == pytest.approx(2 * 3 / (4 + 3))
  assert rows[1]['dice'] == pytest.approx(2 * 2 / (2 + 3))
  pred = np.array([0, 0, 0, 0, 3, 3]).reshape(-1, 1, 1)
  t = scores.contingency(ref, pred)
  assert scores.match_labels(t) == {3: 2}
  rows = scores.dice_table(t)
  assert (rows[0]['label'], rows[0]['dice']) == (None, 0.0)
  assert (rows[1]['label'], rows[1]['dice']) == (3, 1.0)


def test_class_names_from_the_label_store_or_a_phantom(tmp_path):
  store = tmp_path / 'lab.zarr'
  vol = volume.create_zarr(str(store), (2, 2, 2), np.uint8, (1, 1, 1), label_names={'1': 'CSF'})
  del vol
  assert evaluate.class_names(volume.open_volume(str(store))) == {1: 'CSF'}
  paths = phantom.write_phantom(str(tmp_path / 'ph'), (24, 24, 24), 0)
  names = evaluate.class_names(volume.open_volume(paths['labels']))
  assert names == {k: v for k, v in phantom.LABEL_NAMES.items() if k > 0}


def _config(k=3, threshold=500.0, max_fit=3000, figures=True, atropos=False):
  c = base.get_config()
  c.evaluate.atropos = atropos
  c.segment.num_segments = k
  c.segment.kmeans_restarts = 2
  c.evaluate.kmeans_restarts = 2
  c.data.threshold = threshold
  c.evaluate.kmeans_max_fit = max_fit
  c.evaluate.figures = figures
  return c


def _plateaus(shape=(16, 12, 10), levels=(1000, 2000, 3000), dtype=np.uint16, seed=0):
  """Three intensity plateaus (classes 1..3 in bands along axis 2) in a background of 0."""
  rng = np.random.default_rng(seed)
  labels = np.zeros(shape, np.uint8)
  labels[2:-2, 2:-2, 1:-1] = np.repeat([1, 2, 3], -(-(shape[2] - 2) // 3))[: shape[2] - 2]
  image = np.zeros(shape, np.float64)
  for k, level in enumerate(levels, 1):
    image[labels == k] = level
  image += rng.uniform(-40, 40, shape)
  return np.clip(image, 0, None).astype(dtype), labels


@pytest.mark.parametrize(
  'dtype, levels',
  [
    (np.uint16, (1000, 2000, 3000)),  # streamed integer histogram, one bin per value
    (np.uint16, (1000, 30000, 60000)),  # range wider than the Otsu bin cap: rebinned
    (np.float32, (1000, 2000, 3000)),  # Otsu on the sample
  ],
)
def test_baselines_separate_three_plateaus(tmp_path, monkeypatch, dtype, levels):
  image, labels = _plateaus(levels=levels, dtype=dtype)
  img = _save(tmp_path / 'img.zarr', image)
  monkeypatch.setattr(baselines, '_SLAB_VOXELS', 2 * 12 * 10)  # 2-plane slabs: streaming for real
  out = baselines.intensity_baselines(img, _config(max_fit=500), str(tmp_path / 'b'))
  for name in baselines.NAMES:
    assert out[name]['reused'] is False
    pred = volume.open_volume(out[name]['path']).read((0, 0, 0), image.shape)
    np.testing.assert_array_equal(pred, labels)  # labels ordered by intensity, 0 = background
    assert scores.nmi(scores.contingency(labels, pred)) == pytest.approx(1.0)
  assert len(out['kmeans_intensity']['centres']) == 3
  again = baselines.intensity_baselines(img, _config(max_fit=500), str(tmp_path / 'b'))
  assert all(again[n]['reused'] for n in baselines.NAMES)
  assert not baselines.intensity_baselines(img, _config(max_fit=400), str(tmp_path / 'b'))[
    'multi_otsu'
  ]['reused']  # other settings: recomputed


def test_streamed_otsu_equals_skimage_on_the_image():
  rng = np.random.default_rng(3)
  values = np.concatenate([rng.normal(m, 12, 400) for m in (40, 90, 160, 210)]).clip(0, 255)
  values = values.astype(np.uint8)
  counts = np.bincount(values, minlength=256)
  for k in (3, 4):
    got = baselines.otsu_thresholds(counts, np.arange(256), k)
    np.testing.assert_array_equal(got, threshold_multiotsu(values, classes=k))


def test_kmeans_thresholds_are_nearest_centre_assignment():
  rng = np.random.default_rng(4)
  values = rng.gamma(3.0, 300.0, 5000)
  centres = baselines.fit_kmeans_intensity(values, 4, seed=0, restarts=2)
  labels = baselines.label_intensities(values, values > 0, baselines.kmeans_thresholds(centres))
  km = KMeans(n_clusters=4, n_init=2, random_state=0).fit(values.reshape(-1, 1))
  rank = np.argsort(np.argsort(km.cluster_centers_.ravel()))  # sklearn id -> rank by intensity
  np.testing.assert_array_equal(labels, rank[km.predict(values.reshape(-1, 1))] + 1)
  np.testing.assert_allclose(centres, np.sort(km.cluster_centers_.ravel()))
  assert np.all(np.diff(centres) > 0)


def _workdir(tmp_path, annotate=False, spacing=(2.0, 1.0, 1.0)):
  image, labels = _plateaus(shape=(16, 12, 10))
  ref = labels.copy()
  if annotate:
    ref[[i for i in range(16) if i not in (5, 10)]] = 0  # two annotated planes of axis 0
  wd = tmp_path / 'wd'
  wd.mkdir()
  img = _save(tmp_path / 'img.zarr', image, spacing)
  lab = _save(tmp_path / 'lab.zarr', ref, spacing)
  seg = np.array([0, 2, 3, 1], np.uint8)[labels]  # permuted ids
  seg[:, :, :3] = 0  # a band not covered by any patch
  volume.save_zarr(str(wd / evaluate.SEGMENTATION), seg, spacing)
  (wd / 'timings.json').write_text(json.dumps({'train': 10.0, 'segment': 2.5}))
  history = {
    'periods': [
      {'period': 0, 'clusters_start': 50, 'clusters_end': 5, 'merges': 45, 'epochs': 1,
       'loss_mean': 0.4, 'seconds': 1.0, 'nmi_patches': 0.5},
      {'period': 1, 'clusters_start': 5, 'clusters_end': 5, 'merges': 0, 'epochs': 1,
       'loss_mean': 0.2, 'seconds': 1.0, 'nmi_patches': 0.6},
    ],
    'nmi_patches_raw': 0.45,
  }  # fmt: skip
  (wd / evaluate.HISTORY).write_text(json.dumps(history))
  return wd, pipeline.Inputs(config=_config(), image=img, labels=lab), ref, seg


@pytest.mark.parametrize('annotate', [False, True])
def test_evaluate_end_to_end(tmp_path, annotate):
  wd, inputs, ref, seg = _workdir(tmp_path, annotate)
  out = evaluate.evaluate(inputs, str(wd))
  rep = json.loads((wd / 'report.json').read_text())
  for key in ('nmi', 'dice', 'timing_s', 'volume', 'annotated_voxels', 'config', 'versions'):
    assert key in rep
  assert rep['nmi']['jule3d'] == pytest.approx(_sk_nmi(ref, seg), rel=1e-12)
  assert rep['nmi']['kmeans_intensity'] == pytest.approx(1.0)
  assert rep['nmi']['multi_otsu'] == pytest.approx(1.0)
  assert rep['annotated_voxels'] == int((ref > 0).sum())
  assert [r['label'] for r in rep['dice']['jule3d']] == [2, 3, 1]  # seg = (0, 2, 3, 1)[labels]
  assert rep['volume']['shape'] == [16, 12, 10] and rep['volume']['spacing'] == [2.0, 1.0, 1.0]
  assert rep['timing_s']['train'] == 10.0 and rep['timing_s']['evaluate'] > 0
  assert rep['train_history']['nmi_patches_raw'] == 0.45
  assert set(rep['versions']) >= {'python', 'jax', 'flax', 'numpy', 'scikit-learn', 'tensorstore'}
  assert rep['config']['segment']['num_segments'] == 3
  assert out['nmi'] == rep['nmi']
  # Also with a reference: the threshold's foreground, its coverage and the segment sizes.
  fg = inputs.image.read((0, 0, 0), inputs.image.shape) >= 500.0
  assert rep['reference'] is True and rep['figures_error'] is None
  assert rep['threshold']['foreground_voxels'] == int(fg.sum())
  assert rep['coverage']['labelled_fraction'] == pytest.approx((fg & (seg > 0)).sum() / fg.sum())
  assert rep['segments']['jule3d']['labelled_voxels'] == int((seg > 0).sum())
  timings = json.loads((wd / 'timings.json').read_text())
  assert timings['train'] == 10.0 and timings['evaluate'] == rep['timing_s']['evaluate']
  md = (wd / 'report.md').read_text()
  for fig in ('figures/slices.png', 'figures/training.png'):
    assert (wd / fig).stat().st_size > 1000
    assert f']({fig})' in md
  assert '**1.000**' in md  # the best NMI in bold
  for name in baselines.NAMES:
    assert os.path.isdir(wd / evaluate.BASELINES / f'{name}.zarr')
  assert not [n for n in os.listdir(wd) if '.tmp' in n]


def test_evaluate_reuses_baselines_and_can_skip_figures(tmp_path):
  wd, inputs, _, _ = _workdir(tmp_path)
  inputs.config.evaluate.figures = False
  os.remove(wd / evaluate.HISTORY)
  first = evaluate.evaluate(inputs, str(wd))
  assert not os.path.exists(wd / 'figures')
  md = (wd / 'report.md').read_text()
  assert 'Figures disabled' in md and 'No train_history.json' in md
  assert first['train_history'] is None
  second = evaluate.evaluate(inputs, str(wd))
  assert all(second['baselines'][n]['reused'] for n in baselines.NAMES)
  assert second['nmi'] == first['nmi']
  third = evaluate.evaluate(inputs, str(wd), overwrite=True)
  assert not any(third['baselines'][n]['reused'] for n in baselines.NAMES)


def test_evaluate_user_errors(tmp_path):
  # (Without labels evaluate writes an unscored report: tests/test_report.py.)
  wd, inputs, ref, _ = _workdir(tmp_path)
  empty = pipeline.Inputs(
    config=inputs.config, image=inputs.image, labels=_save(tmp_path / 'z.zarr', ref * 0)
  )
  with pytest.raises(UserError, match='no annotated voxel'):
    evaluate.evaluate(empty, str(wd))
  volume.save_zarr(str(wd / evaluate.SEGMENTATION), np.zeros((4, 4, 4), np.uint8), (1, 1, 1))
  with pytest.raises(UserError, match='shape'):
    evaluate.evaluate(inputs, str(wd))
  with pytest.raises(UserError, match='--mode=segment'):
    evaluate.evaluate(inputs, str(tmp_path))
  assert not os.path.exists(wd / 'report.json')


def test_atropos_missing_is_one_log_line_and_the_report_is_still_written(tmp_path, monkeypatch):
  monkeypatch.setenv('JULE3D_ANTS_PYTHON', str(tmp_path / 'no-such-python'))
  wd, inputs, _, _ = _workdir(tmp_path)
  inputs.config.evaluate.atropos = True
  out = evaluate.evaluate(inputs, str(wd))
  assert 'antspyx not installed' in out['baselines']['atropos']['skipped']
  assert out['nmi']['atropos'] is None and out['nmi']['kmeans_intensity'] == pytest.approx(1.0)
  assert 'Atropos (GMM + MRF): skipped' in (wd / 'report.md').read_text()


@pytest.mark.skipif(atropos.interpreter() is None, reason='no .venv-ants (make mni152 creates it)')
def test_atropos_baseline_segments_plateaus_and_is_reused(tmp_path, monkeypatch):
  wd, inputs, ref, _ = _workdir(tmp_path)
  inputs.config.evaluate.atropos = True
  system_tmp = tmp_path / 'system_tmp'
  system_tmp.mkdir()
  monkeypatch.setenv('TMPDIR', str(system_tmp))
  out = evaluate.evaluate(inputs, str(wd))
  assert not os.listdir(system_tmp)  # ants.atropos' probability images stay in the run's work dir
  assert out['nmi']['atropos'] == pytest.approx(1.0)
  stored = volume.open_volume(out['baselines']['atropos']['path'])
  labels = stored.read((0, 0, 0), stored.shape)
  assert set(np.unique(labels[ref > 0])) == {1, 2, 3} and not labels[ref == 0].any()
  np.testing.assert_allclose(stored.spacing, inputs.image.spacing)
  again = evaluate.evaluate(inputs, str(wd))
  assert again['baselines']['atropos']['reused'] and again['nmi'] == out['nmi']
  assert 'Atropos (GMM + MRF)' in (wd / 'report.md').read_text()
