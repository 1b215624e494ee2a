"""Phase-2 evaluation (method §6): scores against reference labels, and the report.

The scores (contingency tables over the annotated voxels, NMI, matched Dice) are jule3d/scores.py.
The baselines (jule3d/baselines.py: k-means on voxel intensity, multi-threshold Otsu) are scored
with the same code on the same voxels.

Without a reference nothing is scored, but the report is written all the same (`summarise`, one more
streaming pass): the threshold and the foreground fraction, the share of the foreground voxels that
got a label, the size of every segment of jule3d and of the baselines, the slices, the training
record and the timings.

`evaluate` writes report.json, report.md (jule3d/report.py) and figures/ (jule3d/figures.py).
"""

import importlib.metadata
import json
import math
import os
import platform
import time
from collections.abc import Mapping
from contextlib import nullcontext

import numpy as np
from absl import logging

from jule3d import atropos, baselines, figures, files, foreground, patches, report, scores, volume
from jule3d.errors import UserError
from jule3d.workdir import BASELINES, HISTORY, REPORT_JSON, REPORT_MD, SEGMENTATION, TIMINGS

METHODS = ('jule3d', *baselines.NAMES, atropos.NAME)
_PACKAGES = (
  'jax', 'jaxlib', 'flax', 'optax', 'tensorstore', 'orbax-checkpoint', 'numpy', 'scipy',
  'scikit-learn', 'scikit-image', 'matplotlib',
)  # fmt: skip


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


def _zattrs(vol) -> dict:
  # A zarr volume's attributes (zarr v2 .zattrs); {} for other formats or an unreadable file.
  attrs = _read_json(os.path.join(os.path.abspath(vol.path), '.zattrs'))
  return attrs if isinstance(attrs, dict) else {}


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
  names = _zattrs(labels).get('label_names')
  if not isinstance(names, dict):
    meta = _read_json(os.path.join(os.path.dirname(path), 'phantom.json'))
    names = meta.get('labels') if isinstance(meta, dict) else None
  if not isinstance(names, dict):
    return {}
  return {int(k): str(v) for k, v in names.items() if str(k).isdigit() and int(k) > 0}


def _working_grid(inputs, img) -> dict | None:
  # Where the method ran, when not on the input's own grid (jule3d/working.py).
  grid = inputs.grid
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


def _segment_sizes(n: np.ndarray) -> dict:
  """A method's label counts (n[v] voxels of label v) as report.json's 'segments' entry."""
  done = int(n[1:].sum())
  return {
    'labelled_voxels': done,
    'unlabelled_voxels': int(n[0]),
    'sizes': [
      {'label': int(v), 'voxels': int(n[v]), 'fraction': int(n[v]) / done}
      for v in np.flatnonzero(n[1:]) + 1
    ],
  }


def _matching(segments: dict, cross: dict) -> dict:
  """jule3d's labels onto themselves, every other method's by its Hungarian match to jule3d's."""
  matching = {'jule3d': {str(s['label']): s['label'] for s in segments['jule3d']['sizes']}}
  for name, counts in cross.items():
    matching[name] = {
      str(p): r for p, r in scores.match_labels(scores.to_table(counts, np.zeros(0))).items()
    }
  return matching


def summarise(
  inputs, predictions: Mapping, *, slab_depth: int | None = None, match: bool = True
) -> dict:
  """Foreground, coverage and segment sizes, in one streaming pass over image and label volumes.

  Needs no reference. The domain is what jule3d.patches.in_domain says for the config (the
  foreground, or the specimen interior with config.patches.domain = 'specimen', up to its envelope
  with config.segment.fill_envelope).

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
  img = inputs.input_volume  # scores and the report live on the input's grid
  interior = inputs.interior
  domain = c.patches.domain
  if inputs.grid is not None:  # the interior lives on the working grid
    interior, domain = None, 'foreground'
  thr, direction = float(c.data.threshold), c.data.foreground
  shape = tuple(img.shape)
  fg_voxels = dom_voxels = labelled = 0
  sizes = {name: np.zeros(1, np.int64) for name in predictions}
  cross = {name: {} for name in predictions if name != 'jule3d'} if match else {}
  with volume.read_errors(img):
    for z0, slab in scores.slabs_of(img, slab_depth or baselines.slab_depth(shape)):
      z1 = z0 + len(slab)
      reads = {name: scores.read_planes(pred, z0, z1) for name, pred in predictions.items()}
      fg = patches.foreground(slab, thr, direction)
      coords = (np.arange(z0, z1), np.arange(shape[1]), np.arange(shape[2]))
      # The voxels that must be labelled (patches.in_domain with the fill's envelope).
      dom = fg if interior is None else interior.inside(fg, *coords, envelope=True)
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
          scores.accumulate(cross[name], r, got[name][mask].astype(np.int64))
  total = math.prod(shape)
  segments = {name: _segment_sizes(n) for name, n in sizes.items()}
  matching = _matching(segments, cross)
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
  img, labels = inputs.input_volume, inputs.labels
  seg = _open_segmentation(inputs, workdir, img)
  tables = {}
  if labels is not None:
    with volume.read_errors(seg):  # our own output, damaged on disk: rerun --mode=segment
      tables = scores.contingencies(labels, {'jule3d': seg})
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
    tables.update(scores.contingencies(labels, ready))
    names = class_names(labels)
    classes = tables['jule3d'].reference_labels.tolist()
    result = _scores(tables, names, computed)
    result['annotated_voxels'] = tables['jule3d'].total
    colouring, planes = result, tables['jule3d'].planes
  else:
    result = {}
    colouring, planes = {'nmi': {}, 'matching': summary['matching']}, None
  history = _read_json(os.path.join(workdir, HISTORY))
  drawn, figure_errors = {}, {}
  if c.evaluate.figures:
    drawn, figure_errors = figures.write_figures(
      workdir, img, labels, {'jule3d': seg, **ready}, planes, colouring, names, history, classes
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
    'groups': _groups(seg),
    'reading': _zattrs(seg).get('reading'),  # the CNN layer k-means read and why (segment.py)
    'timing_s': {'train': timings.get('train'), 'segment': timings.get('segment'), **timings},
    'volume': _volume_record(inputs, img, seg),
    'baselines': computed,
    'figures': drawn,
    'figures_error': figure_errors or None,
    'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
    'config': json.loads(c.to_json_best_effort()),
    'versions': versions(),
    'train_history': history,
  }
  _write_report(workdir, out, timings)
  return out


def _open_segmentation(inputs, workdir: str, img):
  """WORKDIR/segmentation.zarr, checked against the image (and the reference) voxel for voxel."""
  labels = inputs.labels
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
  return seg


def _groups(seg) -> dict | None:
  """groups.structure as the segmentation keeps it (None: written before it existed)."""
  groups = _zattrs(seg).get('groups')
  return groups if isinstance(groups, dict) else None


def _volume_record(inputs, img, seg) -> dict:
  """What report.json says of the input: path, shape, geometry, working grid, labels, output."""
  labels = inputs.labels
  return {
    'path': img.path,
    'shape': list(img.shape),
    'spacing': list(img.spacing),
    'affine': None if img.affine is None else np.asarray(img.affine).tolist(),
    'geometry': getattr(img, 'geometry', None),  # where the spacing came from (volume.geometry)
    'working_grid': _working_grid(inputs, img),
    'dtype': str(img.dtype),
    'labels': labels.path if labels is not None else None,
    'segmentation': seg.path,
  }


def _write_report(workdir: str, out: dict, timings: dict) -> None:
  """report.json, report.md and the timings, each atomically; one log line."""
  files.write_json_atomic(os.path.join(workdir, REPORT_JSON), out)
  files.write_text_atomic(os.path.join(workdir, REPORT_MD), report.markdown(out))
  files.write_json_atomic(os.path.join(workdir, TIMINGS), timings)
  cov = out['coverage']['labelled_fraction']
  logging.info(
    '%slabelled %s of the %d foreground voxels; report in %s',
    f'NMI {out["nmi"]}; ' if 'nmi' in out else 'no reference labels (no NMI); ',
    '-' if cov is None else f'{cov:.1%}',
    out['coverage']['foreground_voxels'],
    os.path.join(workdir, REPORT_MD),
  )


def _scores(tables: dict, names: dict, computed: dict) -> dict:
  out = {'nmi': {}, 'dice': {}, 'dice_mean': {}, 'uncovered_fraction': {}, 'matching': {}}
  for name in METHODS:
    t = tables.get(name)
    if t is None:
      out['nmi'][name] = None
      out['dice'][name] = None
      out['dice_mean'][name] = None
      continue
    rows = scores.dice_table(t, names)
    out['nmi'][name] = scores.nmi(t)
    out['dice'][name] = rows
    out['dice_mean'][name] = float(np.mean([r['dice'] for r in rows]))
    col0 = np.flatnonzero(t.predicted_labels == 0)
    uncovered = int(t.table[:, col0].sum())
    out['uncovered_fraction'][name] = uncovered / t.total
    out['matching'][name] = {str(p): r for p, r in scores.match_labels(t).items()}
  out['skipped'] = {n: b['skipped'] for n, b in computed.items() if 'skipped' in b}
  return out
