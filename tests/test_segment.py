"""Phase 2: projection geometry, checkpoint restore (also another run's), outputs."""

import os

import nibabel as nib
import numpy as np
import pytest
from helpers import run_cli

from configs import smoke
from jule3d import features, segment, volume


def test_outputs_keep_shape_spacing_and_affine(smoke_run):
  img = volume.open_volume(os.path.join(smoke_run, 'phantom', 'image.zarr'))
  seg = volume.open_volume(os.path.join(smoke_run, segment.SEGMENTATION))
  assert seg.shape == img.shape and seg.dtype == np.uint8
  np.testing.assert_allclose(seg.spacing, img.spacing)
  labels = seg.read((0, 0, 0), seg.shape)
  assert set(np.unique(labels)) <= {0, 1, 2, 3} and len(np.unique(labels)) == 4
  nii = nib.load(os.path.join(smoke_run, segment.SEGMENTATION_NIFTI))
  np.testing.assert_array_equal(np.asarray(nii.dataobj), labels)
  np.testing.assert_allclose(nii.header.get_zooms()[:3], img.spacing, rtol=1e-6)


def test_existing_output_is_refused_without_overwrite(smoke_run):
  proc = run_cli('--config=configs/smoke.py', f'--workdir={smoke_run}', '--mode=segment')
  assert proc.returncode == 2 and 'already exists' in proc.stderr and '--overwrite' in proc.stderr


def test_segment_another_volume_with_this_runs_checkpoint(smoke_run, tmp_path):
  # A NIfTI with its own affine, segmented by the smoke run's model.
  rng = np.random.default_rng(0)
  arr = rng.integers(1000, 5000, (30, 28, 26)).astype(np.uint16)
  affine = np.diag([0.5, 0.6, 0.7, 1.0])
  affine[:3, 3] = [10, -5, 3]
  path = str(tmp_path / 'other scan.nii.gz')
  nib.save(nib.Nifti1Image(arr, affine), path)
  work = str(tmp_path / 'other')
  run_cli(
    '--config=configs/smoke.py',
    f'--workdir={work}',
    '--mode=segment',
    f'--config.data.path={path}',
    f'--config.segment.checkpoint={smoke_run}',
    '--config.data.labels=',
    check=True,
  )
  nii = nib.load(os.path.join(work, segment.SEGMENTATION_NIFTI))
  np.testing.assert_allclose(nii.affine, affine)
  assert nii.shape == arr.shape
  assert not os.path.exists(os.path.join(work, 'checkpoints'))


def test_mode_all_with_another_runs_checkpoint_trains_nothing(smoke_run, tmp_path):
  # --mode=all with segment.checkpoint segments with that model and reports: no model of its own.
  work = str(tmp_path / 'reuse')
  run_cli(
    '--config=configs/smoke.py', f'--workdir={work}', f'--config.segment.checkpoint={smoke_run}',
    check=True,
  )  # fmt: skip
  assert not os.path.exists(os.path.join(work, 'checkpoints'))
  assert os.path.exists(os.path.join(work, 'report.json'))
  ours, theirs = (
    volume.open_volume(os.path.join(w, segment.SEGMENTATION)) for w in (work, smoke_run)
  )
  np.testing.assert_array_equal(
    ours.read((0, 0, 0), ours.shape), theirs.read((0, 0, 0), ours.shape)
  )


def test_mismatched_model_names_the_field(smoke_run, tmp_path):
  proc = run_cli(
    '--config=configs/smoke.py',
    f'--workdir={tmp_path}',
    '--mode=segment',
    f'--config.segment.checkpoint={smoke_run}',
    '--config.model.hidden_dim=32',
  )
  assert proc.returncode == 2 and 'model.hidden_dim' in proc.stderr


@pytest.mark.parametrize(
  'flag, field',
  [
    ('--config.patches.mask_outside=False', 'patches.mask_outside'),
    ('--config.patches.outside_fill=mean', 'patches.outside_fill'),
    ('--config.patches.outside_block=2', 'patches.outside_block'),
  ],
)
def test_checkpoint_trained_on_other_masking_names_the_field(smoke_run, tmp_path, flag, field):
  # The smoke run masked the outside with the mirror fill: its features of patches masked another
  # way (or not at all) would mean something else.
  proc = run_cli(
    '--config=configs/smoke.py',
    f'--workdir={tmp_path}',
    '--mode=segment',
    f'--config.segment.checkpoint={smoke_run}',
    flag,
  )
  assert proc.returncode == 2 and field in proc.stderr, proc.stderr


def test_the_masking_check_lets_through_what_gives_the_same_features():
  from configs import smoke

  c = smoke.get_config()
  trained = c.to_dict()
  assert segment.checkpoint_mismatches(trained, c) == []
  # Trained without masking: the fill and its block never reached a patch.
  c.patches.mask_outside = trained['patches']['mask_outside'] = False
  c.patches.outside_fill, c.patches.outside_block = 'mean', 2
  assert segment.checkpoint_mismatches(trained, c) == []
  # A checkpoint older than the masking fields was trained unmasked; one older than the head too.
  for f in ('mask_outside', 'outside_fill', 'outside_block'):
    del trained['patches'][f]
  del trained['model']['head']
  c.model.head = 'flatten'
  assert segment.checkpoint_mismatches(trained, c) == []
  c.patches.mask_outside = True
  assert segment.checkpoint_mismatches(trained, c) == [('patches.mask_outside', False, True)]
  c.patches.patch_size, c.model.head = 13, 'mean'
  got = segment.checkpoint_mismatches(trained, c)
  assert [f for f, _, _ in got] == ['patches.patch_size', 'model.head', 'patches.mask_outside']


def test_no_checkpoint_and_too_many_segments(smoke_run, tmp_path):
  proc = run_cli('--config=configs/smoke.py', f'--workdir={tmp_path}', '--mode=segment')
  assert proc.returncode == 2 and 'no checkpoint' in proc.stderr
  proc = run_cli(
    '--config=configs/smoke.py',
    f'--workdir={tmp_path / "k"}',
    '--mode=segment',
    f'--config.segment.checkpoint={smoke_run}',
    '--config.segment.num_segments=200',
  )
  assert proc.returncode == 2 and 'grid patches' in proc.stderr, proc.stderr


def test_mode_all_writes_the_report(smoke_run):
  import json

  with open(os.path.join(smoke_run, 'report.json')) as f:
    report = json.load(f)
  assert set(report['nmi']) >= {'jule3d', 'kmeans_intensity', 'multi_otsu'}
  assert all(0 <= v <= 1 for v in report['nmi'].values() if v is not None)
  assert report['nmi']['atropos'] is None and 'off' in report['baselines']['atropos']['skipped']
  assert set(report['timing_s']) >= {'train', 'segment', 'evaluate'}
  assert os.path.exists(os.path.join(smoke_run, 'report.md'))
  # The segmentation keeps groups.structure of its features; the report shows it.
  with open(os.path.join(smoke_run, 'segmentation.zarr', '.zattrs')) as f:
    kept = json.load(f)['groups']
  assert report['groups'] == kept and kept['k'] == report['config']['segment']['num_segments']
  assert 0 < kept['unexplained_k'] < kept['unexplained_k_minus_1'] <= 1
  assert abs(kept['ratio'] - kept['unexplained_k'] / kept['unexplained_k_minus_1']) < 1e-3
  with open(os.path.join(smoke_run, 'report.md')) as f:
    assert f'ratio {kept["ratio"]:.2f}' in f.read()


def test_auto_reads_the_layer_the_trainings_group_check_decides(smoke_run, tmp_path):
  import json

  distinct = {'k': 3, 'ratio': 0.25, 'distinct': True}
  assert segment.reading_layer('auto', {'groups': distinct})[0] == 'embedding'
  layer, why = segment.reading_layer(
    'auto', {'groups': {**distinct, 'ratio': 0.47, 'distinct': False}}
  )
  assert layer == 'hidden' and 'fewer than 3 distinct groups (ratio 0.47)' in why
  assert (
    segment.reading_layer('auto', {'periods': []})[0] == 'embedding'
  )  # trained before the check
  assert segment.reading_layer('auto', None)[0] == 'embedding'
  for layer in ('embedding', 'hidden'):  # an explicit layer is read whatever the check says
    assert segment.reading_layer(layer, {'groups': distinct})[0] == layer
  # The smoke run (the recommended method: 'auto') read the layer its own check decides, and the
  # segmentation and the report say which; the features k-means read have that layer's width.
  with open(os.path.join(smoke_run, 'train_history.json')) as f:
    want = 'embedding' if json.load(f)['groups']['distinct'] else 'hidden'
  with open(os.path.join(smoke_run, 'segmentation.zarr', '.zattrs')) as f:
    assert json.load(f)['reading']['layer'] == want
  with open(os.path.join(smoke_run, 'report.md')) as f:
    said = {'embedding': 'embedding', 'hidden': 'hidden layer'}[want]
    assert f"k-means read the CNN's {said} (segment.layer = 'auto'" in f.read()
  work = str(tmp_path / 'again')
  run_cli(
    '--config=configs/smoke.py', f'--workdir={work}', '--mode=segment',
    f'--config.segment.checkpoint={smoke_run}', '--config.segment.save_features=True',
    check=True,
  )  # fmt: skip
  c = smoke.get_config()
  width = {'embedding': c.model.embed_dim, 'hidden': c.model.hidden_dim}[want]
  assert np.load(os.path.join(work, 'features.npz'))['features'].shape[1] == width


def test_features_resume_after_a_crash_without_recomputing_done_parts(tmp_path):
  axes = [np.arange(2, 30, 3)] * 3
  centres = np.stack(np.meshgrid(*axes, indexing='ij'), -1).reshape(-1, 3).astype(np.int32)
  calls = []
  crash_at = [3]

  def compute(part):
    calls.append(len(part))
    if len(calls) == crash_at[0]:
      raise RuntimeError('killed')
    return part.astype(np.float32) * 2.0

  with pytest.raises(RuntimeError):
    features.resumable_features(
      compute, centres, str(tmp_path), 'k', planes_per_part=2, patch_size=5, stride=3
    )
  done_before = len(calls) - 1
  calls.clear()
  crash_at[0] = None
  got = features.resumable_features(
    compute, centres, str(tmp_path), 'k', planes_per_part=2, patch_size=5, stride=3
  )
  np.testing.assert_array_equal(got, centres * 2.0)
  # 10 grid planes in parts of 2: 5 parts, 2 finished before the crash are not computed again.
  assert done_before == 2 and len(calls) == 3
  # Another key (model or grid) never reuses these parts.
  other = features.resumable_features(
    lambda p: p * 3.0, centres, str(tmp_path), 'other', planes_per_part=2, patch_size=5, stride=3
  )
  np.testing.assert_array_equal(other, centres * 3.0)


def test_fill_labels_every_domain_voxel_with_its_nearest_block():
  shape = (14, 12, 13)
  painted = np.zeros(shape, np.uint8)
  painted[4:10, 3:9, 3:6] = 1
  painted[4:10, 3:9, 6:10] = 2
  domain = np.zeros(shape, bool)
  domain[1:13, 1:11, 1:12] = True  # wider than the painted blocks: the faces' band
  out = segment.fill_slab(painted, domain)
  assert np.all(out[domain] > 0) and not out[~domain].any()
  np.testing.assert_array_equal(out[4:10, 3:9, 3:10], painted[4:10, 3:9, 3:10])
  assert np.all(out[domain][:, None] >= 1)
  assert out[6, 6, 1] == 1 and out[6, 6, 11] == 2  # nearest block along x on either side
  # Nothing painted at all: nothing to copy from, the domain stays 0 (no made-up labels).
  assert not segment.fill_slab(np.zeros(shape, np.uint8), domain).any()
