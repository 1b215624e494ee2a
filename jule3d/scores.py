"""Scores against reference labels (method §6): contingency tables, NMI and matched Dice.

Every score is computed from one contingency table between the reference and a prediction, built
slab by slab along axis 0 (never a whole volume in memory) over the ANNOTATED voxels only
(reference > 0; the paper annotated 7 slices). The prediction's 0 (not covered by any patch) is one
more cluster, so a segmentation cannot score by leaving hard voxels out.
"""

import dataclasses
import math
from collections.abc import Iterator, Mapping

import numpy as np
from scipy.optimize import linear_sum_assignment

from jule3d import baselines, volume
from jule3d.errors import UserError


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


def read_planes(x, z0: int, z1: int):
  """Starts reading planes [z0, z1) of a Volume or array; returns a function giving the array."""
  if isinstance(x, volume.Volume):
    future = x.store[z0:z1].read()
    return future.result
  return lambda: np.asarray(x[z0:z1])


def slabs_of(x, depth: int) -> Iterator[tuple[int, np.ndarray]]:
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
  for z0, ref in slabs_of(reference, slab_depth or baselines.slab_depth(shape)):
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
    reads = {name: read_planes(pred, z0 + a, z0 + b) for name, pred in predictions.items()}
    for name, result in reads.items():
      p = np.asarray(result())[mask]
      _check_labels(p, f'prediction {name!r}')
      accumulate(counts[name], r, p.astype(np.int64))
  return {name: to_table(c, planes) for name, c in counts.items()}


def accumulate(counts: dict, r: np.ndarray, p: np.ndarray) -> None:
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


def to_table(counts: dict, planes: np.ndarray) -> Contingency:
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
