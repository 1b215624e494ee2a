"""Config validation: every field a user can get wrong, checked before any expensive work."""

import math

import ml_collections

from jule3d.errors import UserError

# config.cluster.initial_features: what period 0 clusters (jule3d/descriptors.py).
INITIAL_FEATURES = ('raw', 'windowed', 'texture', 'cue')
# config.segment.features: what phase 2 clusters; 'cnn' is the method, the others are its ablations
# (the same pipeline with the learned features replaced by a hand-made input, jule3d/features.py).
SEGMENT_FEATURES = ('cnn', 'intensity', 'initial')
# config.data.threshold given as a rule instead of a number (jule3d/foreground.py).
THRESHOLD_RULES = ('otsu',)


def _require(ok: bool, field: str, value, expected: str) -> None:
  if not ok:
    raise UserError(f'config.{field} = {value!r}: expected {expected}.')


def _int_at_least(c: ml_collections.ConfigDict, field: str, low: int) -> int:
  value = c
  for part in field.split('.'):
    value = value[part]
  _require(
    isinstance(value, int) and not isinstance(value, bool) and value >= low,
    field,
    value,
    f'an integer >= {low}',
  )
  return value


def validate_config(c: ml_collections.ConfigDict) -> None:
  """Raises UserError naming the first field whose value cannot work.

  Args:
    c: the full run config (configs/base.py layout).
  """
  _check_data(c)
  w, n_s = _check_patches(c)
  _check_model(c, w)
  _check_cluster(c, n_s)
  _check_train(c)
  _check_segment(c, w)
  _check_evaluate(c)
  _check_distributed(c)


def _check_data(c: ml_collections.ConfigDict) -> None:
  _require(isinstance(c.seed, int), 'seed', c.seed, 'an integer')
  _require(
    c.data.foreground in ('above', 'below'),
    'data.foreground',
    c.data.foreground,
    "'above' or 'below'",
  )
  thr = c.data.threshold
  _require(
    thr in THRESHOLD_RULES
    if isinstance(thr, str)
    else isinstance(thr, (int, float)) and not isinstance(thr, bool) and math.isfinite(thr),
    'data.threshold',
    thr,
    "a finite number (in the volume's units) or 'otsu' (derived from the image's histogram)",
  )
  for field in ('spacing', 'expected_spacing'):
    spacing = c.data.get(field, ())
    if spacing:
      _require(
        len(spacing) == 3 and all(float(s) > 0 for s in spacing),
        f'data.{field}',
        spacing,
        '() or three positive numbers (one per axis)',
      )
  override = c.data.get('spacing_override', False)
  _require(isinstance(override, bool), 'data.spacing_override', override, 'True or False')
  _require(
    not override or bool(c.data.spacing),
    'data.spacing_override',
    override,
    "config.data.spacing set too (the 3 voxel edges that replace the file's spacing)",
  )
  for field, low in (('max_anisotropy', 1.0), ('resample_spacing', 0.0)):
    value = c.data[field]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    _require(
      ok and (value >= low or value == 0),
      f'data.{field}',
      value,
      f'0 (off / automatic) or a number >= {low:g}' if low else '0 (automatic) or a positive edge',
    )
  _int_at_least(c, 'data.cache_chunk', 8)
  _require(c.data.builtin in ('', 'mni152'), 'data.builtin', c.data.builtin, "'' or 'mni152'")
  _require(
    bool(c.data.path) or bool(c.data.phantom_shape) or c.data.builtin == 'mni152',
    'data.path',
    c.data.path,
    'a volume path (set --config.data.path=/path/to/volume)',
  )


def _check_patches(c: ml_collections.ConfigDict) -> tuple[int, int]:
  w = _int_at_least(c, 'patches.patch_size', 1)
  _require(w % 2 == 1, 'patches.patch_size', w, 'an odd number (a patch needs a centre voxel)')
  n_s = _int_at_least(c, 'patches.num_patches', 2)
  _int_at_least(c, 'patches.outside_block', 1)
  _require(
    c.patches.outside_fill in ('mirror', 'mean'),
    'patches.outside_fill',
    c.patches.outside_fill,
    "'mirror' or 'mean'",
  )
  _require(
    c.patches.domain in ('foreground', 'specimen'),
    'patches.domain',
    c.patches.domain,
    "'foreground' or 'specimen'",
  )
  return w, n_s


def _check_model(c: ml_collections.ConfigDict, w: int) -> None:
  m = c.model
  _require(
    len(m.conv_features) == 3 and all(isinstance(f, int) and f >= 1 for f in m.conv_features),
    'model.conv_features',
    m.conv_features,
    'three positive integers',
  )
  k = _int_at_least(c, 'model.kernel_size', 1)
  p = _int_at_least(c, 'model.pool_size', 1)
  from jule3d import model  # the one closed form of the layer edges (jax only on first use)

  out = model.edges(w, k, p)[3]
  _require(
    out >= 1,
    'patches.patch_size',
    w,
    f'a patch large enough for kernel {k} and pool {p} (the last conv output would be {out} voxels)',
  )
  _require(m.head in ('flatten', 'mean'), 'model.head', m.head, "'flatten' or 'mean'")
  centre = m.centre_size
  _require(
    isinstance(centre, int) and 0 <= centre <= w and (centre == 0 or centre % 2 == 1),
    'model.centre_size',
    centre,
    f'0 (no centre path) or an odd edge up to the patch size {w}',
  )
  _int_at_least(c, 'model.hidden_dim', 1)
  _int_at_least(c, 'model.embed_dim', 1)
  _int_at_least(c, 'model.feature_batch_size', 1)
  _require(
    m.conv_impl in ('auto', 'xla', 'im2col', 'onednn'),
    'model.conv_impl',
    m.conv_impl,
    "'auto', 'xla', 'im2col' or 'onednn'",
  )
  _require(m.dtype in ('float32', 'bfloat16'), 'model.dtype', m.dtype, "'float32' or 'bfloat16'")
  if m.conv_impl == 'onednn':
    from jule3d import onednn

    _require(
      m.dtype == 'float32', 'model.conv_impl', m.conv_impl, "'auto' with model.dtype bfloat16"
    )
    _require(
      onednn.available(),
      'model.conv_impl',
      m.conv_impl,
      "'auto' or 'im2col': the oneDNN extension is not built here (see the warning above)",
    )


def _check_cluster(c: ml_collections.ConfigDict, n_s: int) -> None:
  cl = c.cluster
  num_c = _int_at_least(c, 'cluster.num_clusters', 1)
  _require(
    num_c < n_s,
    'cluster.num_clusters',
    num_c,
    f'fewer clusters than training patches (patches.num_patches = {n_s})',
  )
  k_s = _int_at_least(c, 'cluster.k_s', 1)
  _require(k_s < n_s, 'cluster.k_s', k_s, f'fewer neighbours than patches ({n_s})')
  _int_at_least(c, 'cluster.k_c', 2)
  _require(cl.a > 0, 'cluster.a', cl.a, 'a positive number')
  _require(cl.lam >= 0, 'cluster.lam', cl.lam, 'a number >= 0')
  _require(
    0 < cl.unfolding_rate <= 1, 'cluster.unfolding_rate', cl.unfolding_rate, 'a number in (0, 1]'
  )
  _require(
    cl.initial_features in INITIAL_FEATURES,
    'cluster.initial_features',
    cl.initial_features,
    ' or '.join(repr(f) for f in INITIAL_FEATURES),
  )


def _check_train(c: ml_collections.ConfigDict) -> None:
  t = c.train
  _int_at_least(c, 'train.epochs_per_period', 1)
  _int_at_least(c, 'train.batch_size', 2)
  _int_at_least(c, 'train.num_neg', 1)
  _int_at_least(c, 'train.keep_checkpoints', 1)
  _int_at_least(c, 'train.tries', 1)
  _require(t.learning_rate > 0, 'train.learning_rate', t.learning_rate, 'a positive number')
  _require(0 <= t.momentum < 1, 'train.momentum', t.momentum, 'a number in [0, 1)')
  _require(t.weight_decay >= 0, 'train.weight_decay', t.weight_decay, 'a number >= 0')
  _require(t.margin >= 0, 'train.margin', t.margin, 'a number >= 0')
  _require(
    t.augment in ('none', 'symmetries'), 'train.augment', t.augment, "'none' or 'symmetries'"
  )


def _check_segment(c: ml_collections.ConfigDict, w: int) -> None:
  s = c.segment
  stride = _int_at_least(c, 'segment.stride', 1)
  _require(
    stride <= w,
    'segment.stride',
    stride,
    f'at most the patch size ({w}), or grid patches would leave gaps',
  )
  _int_at_least(c, 'segment.num_segments', 2)
  _require(
    s.num_segments <= 255, 'segment.num_segments', s.num_segments, 'at most 255 (uint8 labels)'
  )
  _int_at_least(c, 'segment.kmeans_restarts', 1)
  _int_at_least(c, 'segment.kmeans_max_fit', 2)
  _int_at_least(c, 'segment.part_planes', 0)
  _require(
    s.feature_path in ('auto', 'dense', 'per_patch'),
    'segment.feature_path',
    s.feature_path,
    "'auto', 'dense' or 'per_patch'",
  )
  _require(s.smoothing >= 0, 'segment.smoothing', s.smoothing, 'a number >= 0 (0 = off)')
  _require(
    s.layer in ('embedding', 'hidden', 'auto'),
    'segment.layer',
    s.layer,
    "'embedding', 'hidden' or 'auto'",
  )
  _require(
    s.features in SEGMENT_FEATURES,
    'segment.features',
    s.features,
    ' or '.join(repr(f) for f in SEGMENT_FEATURES),
  )
  _require(
    s.features != 'initial' or c.cluster.initial_features in ('texture', 'cue'),
    'segment.features',
    s.features,
    "'cnn' or 'intensity' with this cluster.initial_features ('initial' needs 'texture' or 'cue')",
  )


def _check_evaluate(c: ml_collections.ConfigDict) -> None:
  _int_at_least(c, 'evaluate.kmeans_max_fit', 2)
  _int_at_least(c, 'evaluate.kmeans_restarts', 1)
  _int_at_least(c, 'evaluate.atropos_max_voxels', 1)


def _check_distributed(c: ml_collections.ConfigDict) -> None:
  procs = _int_at_least(c, 'distributed.num_processes', 1)
  pid = _int_at_least(c, 'distributed.process_id', 0)
  _require(
    pid < procs,
    'distributed.process_id',
    pid,
    f'0 .. distributed.num_processes - 1 = {procs - 1}',
  )
  coord = c.distributed.coordinator
  _require(
    coord in ('', 'auto') or (isinstance(coord, str) and coord.rpartition(':')[2].isdigit()),
    'distributed.coordinator',
    coord,
    "'host:port' of process 0, 'auto' (cluster environment) or '' (one process)",
  )
  _require(
    procs == 1 or coord != '',
    'distributed.coordinator',
    coord,
    "'host:port' of process 0 when num_processes > 1",
  )
