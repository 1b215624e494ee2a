"""The report is always written: without labels, with any reference, with a failing figure; Otsu."""

import json
import logging

import numpy as np
import pytest
from skimage.filters import threshold_otsu

from configs import base
from jule3d import checks, evaluate, figures, foreground, pipeline, report, scores, volume
from jule3d.errors import UserError

SHAPE = (12, 10, 14)


def _config(k=3, threshold=500.0):
  c = base.get_config()
  c.evaluate.atropos = False
  c.segment.num_segments = k
  c.segment.kmeans_restarts = 2
  c.evaluate.kmeans_restarts = 2
  c.evaluate.kmeans_max_fit = 2000
  c.data.threshold = threshold
  return c


def _save(path, array, spacing=(1.0, 1.0, 1.0)):
  volume.save_zarr(str(path), array, spacing, chunk=4)
  return volume.open_volume(str(path))


def _bands(shape=SHAPE, k=3):
  """Classes 1..k in bands along axis 2, inside a background frame of 0; image = 1000 * class."""
  labels = np.zeros(shape, np.uint8)
  inner = shape[2] - 2
  labels[1:-1, 1:-1, 1:-1] = np.repeat(np.arange(1, k + 1), -(-inner // k))[:inner]
  rng = np.random.default_rng(0)
  image = (1000.0 * labels + rng.uniform(-30, 30, shape)).clip(0, None).astype(np.uint16)
  return image, labels


def _permuted(labels, k):
  """The labels with ids 1..k rotated (1 -> k, 2 -> 1, ...): a clustering is defined up to ids."""
  return np.concatenate([[0], np.roll(np.arange(1, k + 1), 1)]).astype(np.uint8)[labels]


def _workdir(tmp_path, image, seg, history=True):
  """A workdir holding a finished segmentation (and a training record), as evaluate finds it."""
  wd = tmp_path / 'wd'
  wd.mkdir()
  img = _save(tmp_path / 'img.zarr', image)
  volume.save_zarr(str(wd / evaluate.SEGMENTATION), seg, (1.0, 1.0, 1.0))
  (wd / evaluate.TIMINGS).write_text(json.dumps({'train': 3.0, 'segment': 1.0}))
  if history:
    periods = [
      {'period': 0, 'clusters_start': 20, 'clusters_end': 4, 'merges': 16, 'epochs': 1,
       'loss_mean': 0.3, 'seconds': 1.0},
    ]  # fmt: skip
    (wd / evaluate.HISTORY).write_text(json.dumps({'periods': periods}))
  return wd, img


def _evaluate(tmp_path, reference, k=3, image=None, seg=None):
  """evaluate() on the band image with `reference` (an array, or None) and a permuted seg."""
  if image is None:
    image, bands = _bands(k=k)
    seg = _permuted(bands, k)
  wd, img = _workdir(tmp_path, image, seg)
  labels = None if reference is None else _save(tmp_path / 'ref.zarr', reference)
  if labels is not None:
    scores.check_reference(labels)
  inputs = pipeline.Inputs(config=_config(k), image=img, labels=labels)
  out = evaluate.evaluate(inputs, str(wd))
  assert json.loads((wd / 'report.json').read_text()) == out
  assert (wd / 'figures' / 'slices.png').stat().st_size > 1000
  assert out['figures_error'] is None
  return out, wd


def test_without_labels_the_report_has_sizes_coverage_figures_and_no_scores(tmp_path):
  image, bands = _bands()
  seg = _permuted(bands, 3)
  seg[:, :, 1:3] = 0  # a band jule3d left unlabelled: coverage below 100%
  out, wd = _evaluate(tmp_path, None, image=image, seg=seg)
  for key in ('nmi', 'dice', 'dice_mean', 'uncovered_fraction', 'matching', 'annotated_voxels'):
    assert key not in out
  assert out['reference'] is False and out['volume']['labels'] is None
  fg = image >= 500.0
  assert out['coverage']['foreground_voxels'] == int(fg.sum())
  assert out['coverage']['labelled_fraction'] == pytest.approx((fg & (seg > 0)).sum() / fg.sum())
  assert out['coverage']['labelled_fraction'] < 1.0
  assert out['threshold'] == {
    'value': 500.0,
    'rule': 'given',
    'direction': 'above',
    'foreground_voxels': int(fg.sum()),
    'foreground_fraction': pytest.approx(fg.mean()),
  }
  counts = np.bincount(seg.ravel())
  sizes = out['segments']['jule3d']['sizes']
  assert [(s['label'], s['voxels']) for s in sizes] == [(v, counts[v]) for v in (1, 2, 3)]
  assert sum(s['fraction'] for s in sizes) == pytest.approx(1.0)
  for name in ('kmeans_intensity', 'multi_otsu'):  # the baselines are computed and sized too
    stored = volume.open_volume(out['baselines'][name]['path'])
    n = np.bincount(stored.read((0, 0, 0), SHAPE).ravel())
    assert out['segments'][name]['labelled_voxels'] == int(n[1:].sum()) == int(fg.sum())
  assert out['segments']['atropos'] is None
  md = (wd / 'report.md').read_text()
  assert 'no NMI or Dice' in md and '## Scores' not in md and '## Segment sizes' in md
  assert f'of the {int(fg.sum()):,} foreground voxels' in md
  assert f'{100 * (fg & (seg > 0)).sum() / fg.sum():.1f}%' in md
  assert '](figures/slices.png)' in md and '](figures/training.png)' in md
  assert (wd / 'figures' / 'training.png').exists()


def test_run_all_without_labels_evaluates(tmp_path, monkeypatch):
  # pipeline.run's decision: --mode=all always ends with the report (training and segmentation
  # are replaced by a stub that writes a segmentation: what is tested is what follows them).
  from jule3d import segment, train

  image, bands = _bands()
  path = tmp_path / 'img.zarr'
  _save(path, image)
  monkeypatch.setattr(train, 'train', lambda inputs, workdir, overwrite: None)
  monkeypatch.setattr(
    segment,
    'segment',
    lambda inputs, workdir, overwrite: volume.save_zarr(
      f'{workdir}/{evaluate.SEGMENTATION}', bands, (1.0, 1.0, 1.0)
    ),
  )
  c = _config()
  c.data.path = str(path)
  c.patches.patch_size = 5
  c.model.kernel_size = 1
  c.patches.num_patches = 50
  c.cluster.num_clusters = 5
  c.cluster.k_s = 4
  c.segment.stride = 2
  out = pipeline.run(c, str(tmp_path / 'wd'), mode='all')
  assert out is not None and out['reference'] is False
  assert (tmp_path / 'wd' / 'report.md').exists()
  assert out['coverage']['labelled_fraction'] == pytest.approx(1.0)


def _corner_class():
  ref = np.zeros((12, 12, 12), np.uint8)
  ref[:, :, :6], ref[:, :, 6:] = 1, 2
  ref[:3, :3, :3] = 3  # class 3 only in a corner: on none of the three slices through the centre
  pred = ref.copy()
  pred[6, 0, 0] = 3  # ... while the cluster matched to it shows on the axis-0 slice
  return ref, pred


def test_draw_slices_with_a_matched_class_absent_from_the_slices(tmp_path):
  # Used to raise KeyError: 3 (the colour table held only the classes seen on the slices).
  ref, pred = _corner_class()
  vols = {n: _save(tmp_path / f'{n}.zarr', a) for n, a in (('ref', ref), ('pred', pred))}
  image = _save(tmp_path / 'img.zarr', ref.astype(np.float32))
  scores = {'nmi': {'jule3d': 0.9}, 'matching': {'jule3d': {'1': 1, '2': 2, '3': 3}}}
  out = tmp_path / 'slices.png'
  planes = (ref > 0).sum(axis=(1, 2))
  figures.draw_slices(str(out), image, vols['ref'], {'jule3d': vols['pred']}, planes, scores, {})
  assert out.stat().st_size > 1000


def test_evaluate_with_a_class_absent_from_the_slices(tmp_path):
  ref, pred = _corner_class()
  out, _ = _evaluate(tmp_path, ref, image=ref.astype(np.uint16) * 1000, seg=pred)
  assert out['matching']['jule3d']['3'] == 3


def test_a_single_class_reference(tmp_path):
  image, bands = _bands()
  out, wd = _evaluate(tmp_path, (bands > 0).astype(np.uint8))
  assert [r['class'] for r in out['dice']['jule3d']] == [1]
  assert out['nmi']['jule3d'] == 0.0  # one class, three clusters: no information (sklearn's 0)
  assert '## Scores on annotated voxels' in (wd / 'report.md').read_text()


def test_twelve_classes_each_get_their_own_colour(tmp_path):
  colours = figures._palette(12)
  assert len({tuple(np.round(c, 3)) for c in colours}) == 12
  assert all(c.max() > 0.3 for c in colours)  # none close to black (= label 0)
  image, bands = _bands(shape=(10, 8, 26), k=12)
  out, _ = _evaluate(tmp_path, bands, k=12, image=image, seg=bands)
  assert [r['class'] for r in out['dice']['jule3d']] == list(range(1, 13))
  assert out['nmi']['jule3d'] == pytest.approx(1.0)


def test_non_contiguous_label_values(tmp_path):
  image, bands = _bands()
  ref = np.array([0, 5, 200, 200], np.uint8)[bands]  # classes 5 and 200 (and 0)
  out, _ = _evaluate(tmp_path, ref)
  assert [r['class'] for r in out['dice']['jule3d']] == [5, 200]
  assert {r['class']: r['dice'] for r in out['dice']['jule3d']}[5] == pytest.approx(1.0)


def test_integer_labels_stored_as_float(tmp_path):
  image, bands = _bands()
  out, _ = _evaluate(tmp_path, bands.astype(np.float32))
  assert [r['class'] for r in out['dice']['jule3d']] == [1, 2, 3]
  assert out['nmi']['jule3d'] == pytest.approx(1.0)


def test_non_integer_labels_are_refused_naming_the_first_bad_value(tmp_path):
  labels = np.ones(SHAPE, np.float32)
  labels[7, 2, 3] = 1.5
  labels[9, 0, 0] = 2.25
  vol = _save(tmp_path / 'prob.zarr', labels)
  with pytest.raises(UserError, match=r'non-integer values \(the first: 1\.5 at voxel \(7, 2, 3\)'):
    scores.check_reference(vol)


def test_a_failing_figure_is_one_warning_and_a_note(tmp_path, monkeypatch, caplog):
  def broken(*args, **kwargs):
    raise RuntimeError('cannot draw\nsecond line')

  monkeypatch.setattr(figures, 'draw_slices', broken)
  image, bands = _bands()
  wd, img = _workdir(tmp_path, image, bands)
  inputs = pipeline.Inputs(config=_config(), image=img, labels=_save(tmp_path / 'r.zarr', bands))
  with caplog.at_level(logging.WARNING):
    out = evaluate.evaluate(inputs, str(wd))
  assert out['figures_error'] == {'slices': 'RuntimeError: cannot draw'}
  assert 'slices' not in out['figures'] and out['figures']['training'] == 'figures/training.png'
  rep = json.loads((wd / 'report.json').read_text())
  assert rep['figures_error'] == out['figures_error'] and rep['nmi']['jule3d'] == 1.0
  md = (wd / 'report.md').read_text()
  assert 'Figure `slices` could not be drawn (RuntimeError: cannot draw)' in md
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert warnings == ['figure figures/slices.png not drawn: RuntimeError: cannot draw']


# --- config.data.threshold = 'otsu' ---------------------------------------------------------


@pytest.mark.parametrize('dtype', [np.uint16, np.float32])
def test_otsu_threshold_lies_between_two_levels_and_is_reported(tmp_path, dtype):
  rng = np.random.default_rng(1)
  shape = (16, 12, 10)
  inside = np.zeros(shape, bool)
  inside[3:13, 2:10, 2:8] = True
  image = np.where(inside, 3000.0, 1000.0) + rng.normal(0, 60, shape)
  image = image.astype(dtype)
  path = tmp_path / 'img.zarr'
  _save(path, image)
  c = _config(k=2, threshold='otsu')
  c.data.path = str(path)
  c.patches.patch_size = 5
  c.model.kernel_size = 1
  inputs = pipeline.resolve_inputs(c, str(tmp_path / 'wd'))
  value = inputs.config.data.threshold
  assert isinstance(value, float) and 1000 < value < 3000
  assert inputs.config.data.threshold_rule == 'otsu'
  assert c.data.threshold == 'otsu'  # the caller's config is left alone
  fg = image >= value
  if dtype == np.uint16:  # one bin per integer: exactly skimage's `image > threshold_otsu(image)`
    np.testing.assert_array_equal(fg, image > threshold_otsu(image))
  np.testing.assert_array_equal(fg, inside)
  wd = tmp_path / 'wd'
  volume.save_zarr(str(wd / evaluate.SEGMENTATION), inside.astype(np.uint8), (1.0, 1.0, 1.0))
  out = evaluate.evaluate(inputs, str(wd))
  assert out['threshold']['value'] == value and out['threshold']['rule'] == 'otsu'
  assert out['threshold']['foreground_fraction'] == pytest.approx(inside.mean())
  assert out['coverage']['labelled_fraction'] == 1.0
  assert 'derived by Otsu' in (wd / 'report.md').read_text()


def test_a_numeric_threshold_logs_the_foreground_fraction(tmp_path, caplog):
  image, _ = _bands()
  c = _config(threshold=2500)
  img = _save(tmp_path / 'img.zarr', image)
  with caplog.at_level(logging.INFO):
    record = foreground.resolve_threshold(c, img)
  fraction = (image >= 2500).mean()
  assert record['rule'] == 'given' and record['foreground_fraction'] == pytest.approx(fraction)
  assert isinstance(c.data.threshold, float) and 'threshold_rule' not in c.data
  assert any(f'{100 * fraction:.1f}% of the volume' in r.getMessage() for r in caplog.records)


def test_otsu_on_a_constant_volume_is_refused(tmp_path):
  img = _save(tmp_path / 'flat.zarr', np.full(SHAPE, 7, np.uint16))
  with pytest.raises(UserError, match="'otsu': every voxel .* same intensity"):
    foreground.resolve_threshold(_config(threshold='otsu'), img)


@pytest.mark.parametrize('bad', ['Otsu', 'median', '', True, float('nan')])
def test_validate_config_accepts_otsu_and_refuses_other_thresholds(bad):
  def config(threshold):
    c = _config(threshold=threshold)
    c.data.path = 'scan.zarr'  # validate_config only needs one set
    return c

  checks.validate_config(config('otsu'))
  checks.validate_config(config(12))
  with pytest.raises(UserError, match=r"config\.data\.threshold = .*or 'otsu'"):
    checks.validate_config(config(bad))


def test_coverage_counts_the_specimen_domain_slab_by_slab(tmp_path):
  # A hollow specimen: the enclosed air is in the 'specimen' domain, not in the foreground.
  from jule3d import patches, specimen

  image = np.zeros((14, 12, 12), np.uint16)
  image[2:12, 2:10, 2:10] = 3000
  image[5:9, 5:7, 5:7] = 0  # an enclosed cavity
  img = _save(tmp_path / 'img.zarr', image)
  c = _config(k=2)
  c.patches.domain = 'specimen'
  interior = specimen.interior(img, 500.0, 'above', 2)
  seg = (image > 0).astype(np.uint8)  # the cavity left unlabelled
  inputs = pipeline.Inputs(config=c, image=img, labels=None, interior=interior)
  out = evaluate.summarise(inputs, {'jule3d': seg}, slab_depth=3)
  coords = tuple(np.arange(n) for n in image.shape)
  dom = patches.in_domain(image, 500.0, 'above', interior, coords)
  assert dom.sum() > (image >= 500).sum()  # the domain holds the cavity
  assert out['coverage']['foreground_voxels'] == int(dom.sum())
  assert out['coverage']['labelled_voxels'] == int((dom & (seg > 0)).sum())
  assert out['coverage']['labelled_fraction'] < 1.0
  assert out['threshold']['foreground_voxels'] == int((image >= 500).sum())


def test_groups_section_says_whether_the_features_hold_k_groups():
  groups = {'k': 3, 'unexplained_k': 0.039, 'unexplained_k_minus_1': 0.075, 'ratio': 0.52}
  groups['continuum_ratio'] = 0.4444
  merged = '\n'.join(report._groups_lines({**groups, 'distinct': False}))
  assert 'ratio 0.52' in merged and 'gives 0.44' in merged
  assert 'fewer than 3 distinct groups' in merged and '--config.seed' in merged
  held = '\n'.join(report._groups_lines({**groups, 'ratio': 0.23, 'distinct': True}))
  assert 'hold 3 distinct groups' in held and 'fewer' not in held
  assert report._groups_lines(None) == []  # a segmentation written before the check
  read = {'layer': 'hidden', 'why': "segment.layer = 'auto': fewer than 3 distinct groups"}
  text = '\n'.join(report._groups_lines({**groups, 'distinct': False}, read))
  assert "k-means read the CNN's hidden layer (segment.layer = 'auto': fewer than 3" in text


def test_phase1_section_names_the_tries_and_the_kept_one():
  period = {'clusters_start': 50, 'clusters_end': 6, 'loss_mean': 0.2, 'seconds': 3.0}
  history = {'periods': [period], 'nmi_patches_raw': None}
  assert 'train.tries' not in '\n'.join(report._phase1(history, {}))
  tries = [{'try': 0, 'seed': 4, 'ratio': 0.51}, {'try': 1, 'seed': 1004, 'ratio': 0.28}]
  text = '\n'.join(report._phase1({**history, 'tries': tries, 'kept': 1}, {}))
  assert '2 trainings (train.tries' in text and '0.51 (seed 4), 0.28 (seed 1004)' in text
  assert 'kept: try 2' in text
  start = {'ratio': 0.48, 'distinct': False}
  one = '\n'.join(report._phase1({**history, 'groups_start': start, 'groups': start}, {}))
  assert 'One training (train.tries): neither the period-0 features (group ratio 0.48)' in one
  assert 'an intensity model places the cuts better' in one and 'baselines/*.zarr' in one
  held = {**history, 'groups_start': {'ratio': 0.28, 'distinct': True}, 'groups': start}
  assert 'One training' not in '\n'.join(report._phase1(held, {}))
