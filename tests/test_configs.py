"""The shipped configs: the recommended method by default, the paper's one ':paper' switch away."""

import json
import os

import pytest

from configs import base, demo, lung_a, lung_b, lung_c, mni152

# The configs as they were before any extension of the paper existed (the paper's method, as the
# project shipped it): ':paper' must reproduce them field for field.
SNAPSHOT = os.path.join(os.path.dirname(__file__), 'data', 'paper_configs.json')
# Fields added with the extensions, and their paper values (every extension off).
PAPER_VALUES = {
  'patches.mask_outside': False,
  'patches.domain': 'foreground',
  'cluster.initial_features': 'raw',
  'segment.smoothing': 0.0,
  'segment.fill': False,
  'segment.features': 'cnn',
  'model.head': 'flatten',
  'model.centre_size': 0,
  'segment.layer': 'embedding',  # the recommended method decides ('auto')
  'train.augment': 'none',  # tried, not recommended
  'train.tries': 1,  # one training
}
# Fields added since the snapshot: the extensions' switches and the Atropos baseline's settings.
NEW_FIELDS = [f for f in PAPER_VALUES if f != 'patches.mask_outside']
NEW_FIELDS += ['evaluate.atropos', 'evaluate.atropos_max_voxels']
NEW_FIELDS += ['data.spacing_override']  # the file's geometry is the truth: a replacement is opt-in
# The working grid (jule3d/working.py): data handling, a no-op on the paper's isotropic volumes.
NEW_FIELDS += ['data.max_anisotropy', 'data.resample_spacing']
# Fields whose value moved since the snapshot: the paper's voxel edge was imposed on every input as
# data.spacing; it is now data.expected_spacing (a scan's own header wins, a mismatch is logged),
# and data.spacing stays unset in the paper configs.
MOVED = {'data.expected_spacing': 'data.spacing'}
# Fields renamed since the snapshot, value unchanged: each stage reads its own section (the feature
# batch size serves training and segmentation alike; the baselines' k-means has its own restarts).
RENAMED = {'model.feature_batch_size': 'segment.batch_size'}
NEW_FIELDS += ['evaluate.kmeans_restarts']
NEW_FIELDS += ['patches.outside_fill']  # what masking writes: no effect with mask_outside off
NEW_FIELDS += ['segment.fill_envelope']  # off in the paper configs, as the fill


def _get(c, field):
  group, name = field.split('.')
  return c[group][name]


def _without_new_fields(d):
  d = json.loads(json.dumps(d))
  for new, old in MOVED.items():
    (new_group, new_name), (old_group, old_name) = new.split('.'), old.split('.')
    assert d[old_group][old_name] == [], f'{old} is set: the paper configs must leave it unset'
    d[old_group][old_name] = d[new_group].pop(new_name)
  for new, old in RENAMED.items():
    (new_group, new_name), (old_group, old_name) = new.split('.'), old.split('.')
    d[old_group][old_name] = d[new_group].pop(new_name)
  for field in NEW_FIELDS:
    group, name = field.split('.')
    d[group].pop(name)
  return d


CONFIGS = {
  'demo': (demo.get_config, ''),
  'mni152': (mni152.get_config, ''),
  'lung_c': (lung_c.get_config, ''),
  'lung_c_cpu': (lung_c.get_config, 'cpu'),
}


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_paper_switch_reproduces_the_paper_configs(name):
  get, arg = CONFIGS[name]
  paper = get(','.join(w for w in (arg, 'paper') if w))
  with open(SNAPSHOT) as f:
    want = json.load(f)[name]
  assert _without_new_fields(paper.to_dict()) == want
  for field, value in PAPER_VALUES.items():
    assert _get(paper, field) == value, field
    assert _get(base.get_config(), field) == value, field


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_shipped_configs_use_the_recommended_method(name):
  get, arg = CONFIGS[name]
  c = get(arg)
  paper = get(','.join(w for w in (arg, 'paper') if w))
  for field, value in base.RECOMMENDED.items():
    assert _get(c, field) == value, field
  # Small volumes are segmented at stride 1 (the rule in configs/base.py); lung-size ones are not.
  assert c.segment.stride == (1 if name in ('demo', 'mni152') else paper.segment.stride)
  # Apart from the recommended fields and the stride, the method's config is the paper's; on
  # MNI152 also apart from the CPU size, which ':paper' keeps as the config shipped it.
  size = list(base.CPU_SIZE) if name == 'mni152' else []
  for field in [*base.RECOMMENDED, 'segment.stride', *size]:
    group, fname = field.split('.')
    c[group][fname] = paper[group][fname]
  assert c.to_dict() == paper.to_dict()


def test_demo_mni152_and_the_own_scan_config_share_one_cpu_size():
  from configs import scan

  for get in (demo.get_config, mni152.get_config, scan.get_config):
    c = get()
    for field, value in base.CPU_SIZE.items():
      assert _get(c, field) == value, (get.__module__, field)
  # MNI152's ':paper' keeps the size it shipped with (the snapshot above pins all of it).
  assert mni152.get_config('paper').patches.patch_size == 15


def test_every_lung_config_takes_cpu_and_paper():
  for mod in (lung_a, lung_b, lung_c):
    both = mod.get_config('cpu,paper')
    assert both.model.conv_features == (16, 16, 16)
    assert not both.patches.mask_outside and both.cluster.initial_features == 'raw'
    with pytest.raises(ValueError, match='unknown'):
      mod.get_config('gpu')


def test_the_own_scan_config_is_the_recommended_method_with_geometry_from_the_file():
  from configs import scan
  from jule3d import checks

  c, paper = scan.get_config(), scan.get_config('paper')
  for field, value in base.RECOMMENDED.items():
    assert _get(c, field) == value, field
  for field, value in PAPER_VALUES.items():
    assert _get(paper, field) == value, field
  # Geometry comes from the file: the config imposes no spacing; the threshold is derived.
  assert c.data.spacing == () and c.data.expected_spacing == () and not c.data.spacing_override
  assert c.data.threshold == 'otsu' and c.data.max_anisotropy > 1
  c.data.path = '/data/ct.nii.gz'
  checks.validate_config(c)
