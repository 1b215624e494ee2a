"""bench/mni152_thresholds.py: the split NMI from class histograms is the NMI on the voxels."""

import numpy as np

from bench import mni152_thresholds as mt
from jule3d import baselines, scores


def _voxels(seed: int):
  rng = np.random.default_rng(seed)
  truth = rng.integers(1, 4, 5000)
  values = np.clip(60 * truth + rng.normal(0, 25, truth.size), 0, 255).astype(np.uint8)
  hist = np.stack([np.bincount(values[truth == c], minlength=256) for c in (1, 2, 3)])
  return values, truth, hist


def test_split_nmi_equals_nmi_of_the_baselines_labels():
  values, truth, hist = _voxels(0)
  fg = np.ones(values.shape, bool)
  for thresholds in ([90.0, 150.0], [100.5, 170.2], [119.0, 120.0], [60.9, 200.0]):
    labels = baselines.label_intensities(values, fg, np.asarray(thresholds))
    table = np.zeros((4, 4), np.int64)
    np.add.at(table, (truth, labels), 1)
    expected = scores.nmi(table[1:, 1:])
    assert abs(mt.split_nmi(hist, *mt.as_split(np.asarray(thresholds))) - expected) < 1e-12


def test_best_split_finds_separable_classes():
  truth = np.repeat([1, 2, 3], [300, 500, 200])
  values = np.concatenate([np.full(300, 70), np.full(500, 130), np.full(200, 220)])
  hist = np.stack([np.bincount(values[truth == c], minlength=256) for c in (1, 2, 3)])
  nmi, t1, t2 = mt.best_split(hist)
  assert nmi == 1.0
  assert 70 < t1 <= 130 < t2 <= 220


def test_best_split_beats_every_other_split():
  _, _, hist = _voxels(1)
  nmi, t1, t2 = mt.best_split(hist)
  rng = np.random.default_rng(2)
  for a, b in rng.integers(40, 250, (200, 2)):
    a, b = sorted((int(a), int(b)))
    if a < b:
      assert mt.split_nmi(hist, a, b) <= nmi
  assert mt.split_nmi(hist, t1, t2) == nmi
