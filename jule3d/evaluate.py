"""Phase-2 evaluation (method §6): NMI and matched Dice against reference labels, and the report.

Every score is computed from one contingency table between the reference and a prediction, built
slab by slab along axis 0 (never a whole volume in memory) over the ANNOTATED voxels only
(reference > 0; the paper annotated 7 slices). The prediction's 0 (not covered by any patch) is one
more cluster, so a segmentation cannot score by leaving hard voxels out.

The baselines (jule3d/baselines.py: k-means on voxel intensity, multi-threshold Otsu) are scored
with the same code on the same voxels.

Without a reference nothing is scored, but the report is written all the same (`summarise`, one more
streaming pass): the threshold and the foreground fraction, the share of the foreground voxels that
got a label, the size of every segment of jule3d and of the baselines, the slices, the training
record and the timings.

`evaluate` writes report.json, report.md and figures/ (jule3d/report.py) into the workdir.
"""

import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import time
from collections.abc import Iterator, Mapping
from contextlib import nullcontext

import numpy as np
from absl import logging
from scipy.optimize import linear_sum_assignment

from jule3d import atropos, baselines, files, foreground, patches, report, volume
from jule3d.errors import UserError
from jule3d.workdir import BASELINES, HISTORY, REPORT_JSON, REPORT_MD, SEGMENTATION, TIMINGS

METHODS = ('jule3d', *baselines.NAMES, atropos.NAME)
_PACKAGES = (
  'jax', 'jaxlib', 'flax', 'optax', 'tensorstore', 'orbax-checkpoint', 'numpy', 'scipy',
  'scikit-learn', 'scikit-image', 'matplotlib',
)  # fmt: skip


# --- Contingency table, NMI, Dice -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Contingency:
  """Counts of annotated voxels per (reference class, predicted label).

  Attributes:
    table: [R, P] int64 counts; only labels seen on annotated voxels have a row / column.
    reference_labels: [R] the reference label of each row (all > 0).
    predicted_labels: [P] the predicted label of each column (0 = not covered).
    planes: annotated voxels per plane of axis 0.
  """

  table: np.ndarray
  reference_labels: np.ndarray
  predicted_labels: np.ndarray
  planes: np.ndarray

  @property
  def total(self) -> int:
    """Number of annotated (scored) voxels."""
    return int(self.table.sum())


def _read(x, z0: int, z1: int):
  """Starts reading planes [z0, z1) of a Volume or array; returns a function giving the array."""
  if isinstance(x, volume.Volume):
    future = x.store[z0:z1].read()
    return future.result
  return lambda: np.asarray(x[z0:z1])


def _slabs(x, depth: int) -> Iterator[tuple[int, np.ndarray]]:
  if isinstance(x, volume.Volume):
    yield from x.slabs(depth)
  else:
    for z0 in range(0, x.shape[0], depth):
      yield z0, np.asarray(x[z0 : z0 + depth])


def _first(bad: np.ndarray, values: np.ndarray, z0: int) -> str:
  """'V at voxel (z, y, x)' of the first True of `bad` (the voxel only for a 3D slab)."""
  index = tuple(int(i) for i in np.argwhere(bad)[0])
  where = f' at voxel {(index[0] + z0, *index[1:])}' if values.ndim == 3 else ''
  return f'{values[index].item():g}{where}'


def _check_labels(values: np.ndarray, what: str, z0: int = 0) -> None:
  if values.dtype.kind == 'f':
    bad = ~np.isfinite(values) | (values != np.round(values))
    if bad.any():
      raise UserError(
        f'{what} holds non-integer values (the first: {_first(bad, values, z0)}): expected integer '
        'labels (0 = not annotated, 1..n = classes; integers stored as floats are fine).'
      )
  elif values.dtype.kind not in 'biu':
    raise UserError(f'{what} has dtype {values.dtype}: expected integer labels.')
  if values.dtype.kind != 'u' and values.size and values.min() < 0:
    raise UserError(
      f'{what} holds negative values (the first: {_first(values < 0, values, z0)}): expected '
      'labels >= 0.'
    )


def check_reference(labels) -> None:
  """Reads a reference label volume once, slab by slab: every chunk readable, integer, >= 0.

  Called when the inputs are resolved, so that a bad label volume fails in seconds rather than
  after training. Integer values stored as floats (1.0, 2.0) are accepted.

  Args:
    labels: the reference Volume (config.data.labels).

  Raises:
    UserError: a damaged chunk, non-integer or negative labels, naming the volume and the first
      bad value.
  """
  with volume.read_errors(labels):
    for z0, slab in labels.slabs(baselines.slab_depth(labels.shape)):
      _check_labels(slab, f'config.data.labels {labels.path!r}', z0)


def contingencies(reference, predictions: Mapping, *, slab_depth: int | None = None) -> dict:
  """Contingency tables of several predictions against one reference, in one streaming pass.

  The reference is read once, slab by slab; each prediction only on the planes of a slab that hold
  annotated voxels (a reference of 7 annotated slices costs 7 planes per prediction).

  Args:
    reference: Volume or array; 0 = not annotated, 1..n = classes.
    predictions: name -> Volume or array of the same shape (0 = not covered).
    slab_depth: planes per slab (default: ~8M voxels, at most 64).

  Returns:
    name -> Contingency.

  Raises:
    UserError: shapes differ, or non-integer / negative labels.
  """
  shape = tuple(reference.shape)
  for name, pred in predictions.items():
    if tuple(pred.shape) != shape:
      raise UserError(
        f'prediction {name!r} has shape {tuple(pred.shape)}, the reference {shape}: label volumes '
        'must match voxel for voxel.'
      )
  counts = {name: {} for name in predictions}
  planes = np.zeros(shape[0], np.int64)
  for z0, ref in _slabs(reference, slab_depth or baselines.slab_depth(shape)):
    ref = np.asarray(ref)
    _check_labels(ref, 'the reference labels', z0)
    mask = ref > 0
    per_plane = mask.reshape(len(mask), -1).sum(axis=1)
    planes[z0 : z0 + len(mask)] = per_plane
    hit = np.flatnonzero(per_plane)
    if not len(hit):
      continue
    a, b = int(hit[0]), int(hit[-1]) + 1
    mask = mask[a:b]
    r = ref[a:b][mask].astype(np.int64)  # only the annotated voxels are widened
    reads = {name: _read(pred, z0 + a, z0 + b) for name, pred in predictions.items()}
    for name, result in reads.items():
      p = np.asarray(result())[mask]
      _check_labels(p, f'prediction {name!r}')
      _accumulate(counts[name], r, p.astype(np.int64))
  return {name: _to_table(c, planes) for name, c in counts.items()}


def _accumulate(counts: dict, r: np.ndarray, p: np.ndarray) -> None:
  width = int(p.max()) + 1
  code = r * width + p
  if (int(r.max()) + 1) * width <= 1 << 22:
    cells = np.bincount(code)
    keys = np.flatnonzero(cells)
    values = cells[keys]
  else:  # sparse, huge label values: sort instead of a dense table
    keys, values = np.unique(code, return_counts=True)
  for key, n in zip(keys.tolist(), values.tolist(), strict=True):
    pair = divmod(key, width)
    counts[pair] = counts.get(pair, 0) + n


def _to_table(counts: dict, planes: np.ndarray) -> Contingency:
  rows = np.array(sorted({r for r, _ in counts}), np.int64)
  cols = np.array(sorted({p for _, p in counts}), np.int64)
  table = np.zeros((len(rows), len(cols)), np.int64)
  for (r, p), n in counts.items():
    table[np.searchsorted(rows, r), np.searchsorted(cols, p)] = n
  return Contingency(table, rows, cols, planes.copy())


def contingency(reference, prediction, *, slab_depth: int | None = None) -> Contingency:
  """Contingency table of one prediction against the reference, over annotated voxels only.

  Args:
    reference: Volume or array; 0 = not annotated, 1..n = classes.
    prediction: Volume or array of the same shape; 0 = not covered (counted as one more cluster).
    slab_depth: planes per slab (default: ~8M voxels, at most 64).

  Returns:
    The Contingency.
  """
  return contingencies(reference, {'prediction': prediction}, slab_depth=slab_depth)['prediction']


def _entropy(counts: np.ndarray) -> float:
  counts = counts[counts > 0].astype(np.float64)
  if counts.size <= 1:
    return 0.0
  total = counts.sum()
  return float(-np.sum((counts / total) * (np.log(counts) - math.log(total))))


def nmi(table) -> float:
  """Normalised mutual information I(Y;P) / sqrt(H(Y) H(P)) from a contingency table.

  Equals sklearn's `normalized_mutual_info_score(y, p, average_method='geometric')` on the same
  voxels, degenerate cases included: no voxel, or one class and one cluster -> 1.0 (identical
  trivial partitions); a single class or a single cluster otherwise -> 0.0 (no information).

  Args:
    table: a Contingency, or a 2D array of counts (rows: reference classes, columns: clusters).

  Returns:
    The NMI in [0, 1].
  """
  t = np.asarray(table.table if isinstance(table, Contingency) else table, np.float64)
  t = t[t.sum(axis=1) > 0][:, t.sum(axis=0) > 0]
  if t.shape[0] == t.shape[1] <= 1:
    return 1.0
  rows, cols = np.nonzero(t)
  nz = t[rows, cols]
  total = nz.sum()
  pi, pj = t.sum(axis=1), t.sum(axis=0)
  if pi.size == 1 or pj.size == 1:
    return 0.0
  # sklearn's formula and its rounding of tiny terms, so that 'mi == 0' agrees with it.
  outer = pi[rows] * pj[cols]
  log_outer = -np.log(outer) + math.log(pi.sum()) + math.log(pj.sum())
  p = nz / total
  mi = p * (np.log(nz) - math.log(total)) + p * log_outer
  mi = float(np.clip(np.where(np.abs(mi) < np.finfo(mi.dtype).eps, 0.0, mi).sum(), 0.0, None))
  if mi == 0:
    return 0.0
  return float(mi / math.sqrt(_entropy(pi) * _entropy(pj)))


def match_labels(table: Contingency) -> dict[int, int]:
  """Hungarian matching of predicted labels to reference classes, maximising total overlap.

  The prediction's 0 (not covered) is never matched; a pair with no overlap is not a match.

  Args:
    table: the Contingency.

  Returns:
    predicted label -> reference class, one-to-one (min(classes, clusters) pairs at most).
  """
  cols = np.flatnonzero(table.predicted_labels > 0)
  if not len(cols) or not len(table.reference_labels):
    return {}
  overlap = table.table[:, cols]
  rows, picked = linear_sum_assignment(overlap, maximize=True)
  return {
    int(table.predicted_labels[cols[j]]): int(table.reference_labels[i])
    for i, j in zip(rows, picked, strict=True)
    if overlap[i, j] > 0
  }


def dice_table(table: Contingency, names: Mapping[int, str] | None = None) -> list[dict]:
  """Per reference class: the Hungarian-matched predicted label and its Dice on annotated voxels.

  Dice = 2 |Y_c & P_j| / (|Y_c| + |P_j|), sizes counted over annotated voxels only.

  Args:
    table: the Contingency.
    names: optional reference class -> name.

  Returns:
    One dict per reference class: 'class', 'name', 'voxels', 'label' (matched predicted label,
    None when unmatched) and 'dice' (0.0 when unmatched).
  """
  match = {ref: pred for pred, ref in match_labels(table).items()}
  col = {int(p): j for j, p in enumerate(table.predicted_labels)}
  sizes, pred_sizes = table.table.sum(axis=1), table.table.sum(axis=0)
  out = []
  for i, ref in enumerate(table.reference_labels.tolist()):
    pred = match.get(ref)
    dice = 0.0
    if pred is not None:
      j = col[pred]
      dice = 2.0 * table.table[i, j] / (sizes[i] + pred_sizes[j])
    name = (names or {}).get(ref, f'class {ref}')
    out.append(
      {'class': ref, 'name': name, 'voxels': int(sizes[i]), 'label': pred, 'dice': float(dice)}
    )
  return out


# --- The evaluate mode ------------------------------------------------------------------------


def versions() -> dict:
  """Versions of Python and the packages a result depends on (None when not installed).

  Returns:
    name -> version string.
  """
  out = {'python': platform.python_version()}
  for name in _PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def class_names(labels) -> dict[int, str]:
  """Reference class names, where the labels carry them; callers fall back to 'class N'.

  Looked up in the labels store's 'label_names' attribute ({"1": "CSF", ...}, zarr v2 .zattrs),
  then in a phantom.json beside it (the built-in phantom).

  Args:
    labels: the reference Volume.

  Returns:
    class -> name (empty when unknown).
  """
  path = os.path.abspath(labels.path)
  attrs = _read_json(os.path.join(path, '.zattrs'))
  names = attrs.get('label_names') if isinstance(attrs, dict) else None
  if not isinstance(names, dict):
    meta = _read_json(os.path.join(os.path.dirname(path), 'phantom.json'))
    names = meta.get('labels') if isinstance(meta, dict) else None
  if not isinstance(names, dict):
    return {}
  return {int(k): str(v) for k, v in names.items() if str(k).isdigit() and int(k) > 0}


def _input_image(inputs):
  # The volume as the user gave it (pipeline.Inputs.input_volume): scores, baselines and the
  # report live on its grid, also when the method ran on a working copy.
  return getattr(inputs, 'input_volume', None) or inputs.image


def _working_grid(inputs, img) -> dict | None:
  # Where the method ran, when not on the input's own grid (jule3d/working.py).
  grid = getattr(inputs, 'grid', None)
  if grid is None:
    return None
  from jule3d import working

  return {
    'shape': list(grid.shape),
    'spacing': list(grid.spacing(img.spacing)),
    'pad': list(grid.pad),
    'description': working.describe(grid, img.spacing),
  }


def _counts(labels: np.ndarray) -> np.ndarray:
  """Voxels per label value (index = label)."""
  flat = labels.ravel()
  if flat.dtype == np.uint8:
    return np.bincount(flat, minlength=256)
  values, n = np.unique(flat.astype(np.int64), return_counts=True)
  out = np.zeros(int(values.max()) + 1 if values.size else 1, np.int64)
  out[values] = n
  return out


def _add(total: np.ndarray, counts: np.ndarray) -> np.ndarray:
  if len(counts) > len(total):
    total = np.concatenate([total, np.zeros(len(counts) - len(total), total.dtype)])
  total[: len(counts)] += counts
  return total


def summarise(
  inputs, predictions: Mapping, *, slab_depth: int | None = None, match: bool = True
) -> dict:
  """Foreground, coverage and segment sizes, in one streaming pass over image and label volumes.

  Needs no reference. The domain is what jule3d.patches.in_domain says for the config (the
  foreground, or the specimen interior with config.patches.domain = 'specimen').

  Args:
    inputs: pipeline.Inputs (config with a numeric data.threshold, image, interior).
    predictions: method name -> label Volume or array of the image's shape; 'jule3d' must be one.
    slab_depth: planes per slab (default: ~8M voxels, at most 64).
    match: also match every other method's labels to jule3d's (the colours without a reference);
      False: 'matching' holds jule3d's only.

  Returns:
    {'threshold': {'value', 'rule', 'direction', 'foreground_voxels', 'foreground_fraction'},
     'coverage': {'domain', 'foreground_voxels', 'labelled_voxels', 'labelled_fraction'} (the
       domain voxels jule3d labelled > 0),
     'segments': method -> {'labelled_voxels', 'unlabelled_voxels', 'sizes': [{'label',
       'voxels', 'fraction' (of the method's labelled voxels)}]},
     'matching': method -> {label (str): jule3d label}, the Hungarian match of every other
       method's labels to jule3d's over the voxels jule3d labelled (colours without a reference)}.
  """
  c = inputs.config
  img = _input_image(inputs)
  interior = getattr(inputs, 'interior', None)
  domain = c.patches.domain
  if getattr(inputs, 'grid', None) is not None:  # the interior lives on the working grid
    interior, domain = None, 'foreground'
  thr, direction = float(c.data.threshold), c.data.foreground
  shape = tuple(img.shape)
  fg_voxels = dom_voxels = labelled = 0
  sizes = {name: np.zeros(1, np.int64) for name in predictions}
  cross = {name: {} for name in predictions if name != 'jule3d'} if match else {}
  with volume.read_errors(img):
    for z0, slab in _slabs(img, slab_depth or baselines.slab_depth(shape)):
      z1 = z0 + len(slab)
      reads = {name: _read(pred, z0, z1) for name, pred in predictions.items()}
      fg = patches.foreground(slab, thr, direction)
      coords = (np.arange(z0, z1), np.arange(shape[1]), np.arange(shape[2]))
      dom = fg if interior is None else interior.inside(fg, *coords)  # patches.in_domain
      fg_voxels += int(fg.sum())
      dom_voxels += int(dom.sum())
      got = {}
      for name, result in reads.items():
        pred = predictions[name]
        with volume.read_errors(pred) if isinstance(pred, volume.Volume) else nullcontext():
          got[name] = np.asarray(result())
        sizes[name] = _add(sizes[name], _counts(got[name]))
      seg = got['jule3d']
      labelled += int(np.count_nonzero(seg[dom]))
      mask = seg > 0
      if mask.any():
        r = seg[mask].astype(np.int64)
        for name in cross:
          _accumulate(cross[name], r, got[name][mask].astype(np.int64))
  total = math.prod(shape)
  segments = {}
  for name, n in sizes.items():
    done = int(n[1:].sum())
    segments[name] = {
      'labelled_voxels': done,
      'unlabelled_voxels': int(n[0]),
      'sizes': [
        {'label': int(v), 'voxels': int(n[v]), 'fraction': int(n[v]) / done}
        for v in np.flatnonzero(n[1:]) + 1
      ],
    }
  matching = {'jule3d': {str(s['label']): s['label'] for s in segments['jule3d']['sizes']}}
  for name, counts in cross.items():
    matching[name] = {str(p): r for p, r in match_labels(_to_table(counts, np.zeros(0))).items()}
  return {
    'threshold': {
      'value': thr,
      'rule': c.data.get('threshold_rule', foreground.GIVEN),
      'direction': direction,
      'foreground_voxels': fg_voxels,
      'foreground_fraction': fg_voxels / total,
    },
    'coverage': {
      'domain': domain,
      'foreground_voxels': dom_voxels,
      'labelled_voxels': labelled,
      'labelled_fraction': labelled / dom_voxels if dom_voxels else None,
    },
    'segments': segments,
    'matching': matching,
  }


def evaluate(inputs, workdir: str, overwrite: bool = False) -> dict:
  """Summarises and, with reference labels, scores WORKDIR/segmentation.zarr and the baselines.

  Always writes report.json, report.md and figures/: segment sizes, coverage of the foreground,
  the threshold, the slices, the training record and the timings; with config.data.labels also
  NMI and matched Dice on the annotated voxels. A figure that cannot be drawn is one warning and a
  note ('figures_error'), never a failed report.

  Args:
    inputs: pipeline.Inputs (or any object with .config, .image, .labels; .interior optional).
    workdir: the run directory.
    overwrite: recompute the baselines even when valid stores exist (the report itself is always
      rewritten: it is cheap and derived).

  Returns:
    The report dict (what report.json holds).

  Raises:
    UserError: no segmentation yet, mismatched shapes, or a reference with no annotated voxel.
  """
  t0 = time.time()
  c = inputs.config
  img, labels = _input_image(inputs), inputs.labels
  seg_path = os.path.join(workdir, SEGMENTATION)
  if not os.path.isdir(seg_path):
    raise UserError(f'{seg_path!r} does not exist: run --mode=segment first (or --mode=all).')
  seg = volume.open_volume(seg_path, name='segmentation')
  for what, vol in (('segmentation', seg), ('config.data.labels', labels)):
    if vol is not None and vol.shape != img.shape:
      raise UserError(
        f'{what} {vol.path!r} has shape {vol.shape}, the image {img.shape}: label volumes '
        'must match the image voxel for voxel (was the segmentation made from another image?).'
      )
  k = int(c.segment.num_segments)
  if not 1 <= k <= 255:
    raise UserError(f'config.segment.num_segments = {k}: expected 1..255 (uint8 labels).')
  tables = {}
  if labels is not None:
    with volume.read_errors(seg):  # our own output, damaged on disk: rerun --mode=segment
      tables = contingencies(labels, {'jule3d': seg})
    if not tables['jule3d'].total:
      raise UserError(
        f'config.data.labels {labels.path!r} has no annotated voxel (all 0): expected '
        'class labels 1..n on at least one slice.'
      )
  out_dir = os.path.join(workdir, BASELINES)
  computed = baselines.intensity_baselines(img, c, out_dir, overwrite=overwrite)
  computed[atropos.NAME] = atropos.atropos_baseline(img, c, out_dir, overwrite=overwrite)
  ready = {n: volume.open_volume(b['path'], name=n) for n, b in computed.items() if 'path' in b}
  # Reads name a damaged volume; the baselines are matched to jule3d only to colour them when
  # there is no reference (with one, each is matched to the reference below).
  summary = summarise(inputs, {'jule3d': seg, **ready}, match=labels is None)
  names, classes = {}, ()
  if labels is not None:
    tables.update(contingencies(labels, ready))
    names = class_names(labels)
    classes = tables['jule3d'].reference_labels.tolist()
    result = _scores(tables, names, computed)
    result['annotated_voxels'] = tables['jule3d'].total
    colouring, planes = result, tables['jule3d'].planes
  else:
    result = {}
    colouring, planes = {'nmi': {}, 'matching': summary['matching']}, None
  history = _read_json(os.path.join(workdir, HISTORY))
  figures, figure_errors = {}, {}
  if c.evaluate.figures:
    figures, figure_errors = report.write_figures(
      workdir, inputs, {'jule3d': seg, **ready}, planes, colouring, names, history, classes
    )
  timings = _read_json(os.path.join(workdir, TIMINGS))
  timings = timings if isinstance(timings, dict) else {}
  timings['evaluate'] = round(time.time() - t0, 3)
  out = {
    **result,
    'reference': labels is not None,
    'threshold': summary['threshold'],
    'coverage': summary['coverage'],
    'segments': {m: summary['segments'].get(m) for m in METHODS},
    'timing_s': {'train': timings.get('train'), 'segment': timings.get('segment'), **timings},
    'volume': {
      'path': img.path,
      'shape': list(img.shape),
      'spacing': list(img.spacing),
      'affine': None if img.affine is None else np.asarray(img.affine).tolist(),
      'geometry': getattr(img, 'geometry', None),  # where the spacing came from (volume.geometry)
      'working_grid': _working_grid(inputs, img),
      'dtype': str(img.dtype),
      'labels': labels.path if labels is not None else None,
      'segmentation': seg_path,
    },
    'baselines': computed,
    'figures': figures,
    'figures_error': figure_errors or None,
    'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
    'config': json.loads(c.to_json_best_effort()),
    'versions': versions(),
    'train_history': history,
  }
  files.write_json_atomic(os.path.join(workdir, REPORT_JSON), out)
  files.write_text_atomic(os.path.join(workdir, REPORT_MD), report.markdown(out))
  files.write_json_atomic(os.path.join(workdir, TIMINGS), timings)
  cov = summary['coverage']['labelled_fraction']
  logging.info(
    '%slabelled %s of the %d foreground voxels; report in %s',
    f'NMI {out["nmi"]}; ' if 'nmi' in out else 'no reference labels (no NMI); ',
    '-' if cov is None else f'{cov:.1%}',
    summary['coverage']['foreground_voxels'],
    os.path.join(workdir, REPORT_MD),
  )
  return out


def _scores(tables: dict, names: dict, computed: dict) -> dict:
  scores = {'nmi': {}, 'dice': {}, 'dice_mean': {}, 'uncovered_fraction': {}, 'matching': {}}
  for name in METHODS:
    t = tables.get(name)
    if t is None:
      scores['nmi'][name] = None
      scores['dice'][name] = None
      scores['dice_mean'][name] = None
      continue
    rows = dice_table(t, names)
    scores['nmi'][name] = nmi(t)
    scores['dice'][name] = rows
    scores['dice_mean'][name] = float(np.mean([r['dice'] for r in rows]))
    col0 = np.flatnonzero(t.predicted_labels == 0)
    uncovered = int(t.table[:, col0].sum())
    scores['uncovered_fraction'][name] = uncovered / t.total
    scores['matching'][name] = {str(p): r for p, r in match_labels(t).items()}
  scores['skipped'] = {n: b['skipped'] for n, b in computed.items() if 'skipped' in b}
  return scores
