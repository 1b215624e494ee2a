"""MNI152 reference labels: the protocol on raw uint8 values."""

import numpy as np

from jule3d import datasets


def test_mni152_labels_protocol():
  t1 = np.array([10, 60, 60, 60, 60, 200], np.uint8)
  gm = np.array([255, 0, 200, 100, 85, 10], np.uint8)
  wm = np.array([0, 0, 50, 150, 85, 240], np.uint8)
  # csf = 255 - gm - wm = [0, 255, 5, 5, 85, 5]; ties (85, 85, 85) go to CSF; t1 < 52 is outside.
  np.testing.assert_array_equal(datasets.mni152_labels(t1, gm, wm), [0, 1, 2, 3, 1, 3])


def test_negative_csf_is_clipped():
  t1 = np.full(2, 100, np.uint8)
  gm = np.array([200, 130], np.uint8)
  wm = np.array([200, 130], np.uint8)  # gm + wm > 255: csf would be negative
  np.testing.assert_array_equal(datasets.mni152_labels(t1, gm, wm), [2, 2])


def test_mni152_files_are_the_template_and_its_maps(monkeypatch):
  monkeypatch.setattr(datasets, 'nilearn_data_dir', lambda: '/d')
  files = datasets.mni152_files()
  assert sorted(files) == ['gm', 't1', 'wm']
  assert files['t1'] == '/d/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz'
  assert files['gm'].endswith('_gm_tal_nlin_sym_09a_converted.nii.gz')
