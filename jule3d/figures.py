"""The report's figures (figures/slices.png, figures/training.png), drawn with matplotlib.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
switch) and written atomically. Cluster ids are arbitrary, so every prediction is recoloured by its
Hungarian match to the reference classes: the same colour means the same matched class in every
panel; unmatched clusters get colours of their own; 0 (not annotated / not covered / background)
is black.
"""

import colorsys
import math
import os

import numpy as np
from absl import logging
from scipy import ndimage

from jule3d import baselines, files
from jule3d.workdir import FIGURES

_PANEL_IN = 3.2  # panel width, inches


_DPI = 100


TITLES = {
  'jule3d': 'jule3d',
  'kmeans_intensity': 'k-means (intensity)',
  'multi_otsu': 'multi-Otsu',
  'atropos': 'Atropos (GMM + MRF)',
}


# Class colours (tab10 without its grey).
_CLASS_COLOURS = (
  '#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#bcbd22', '#17becf',
)  # fmt: skip


# More classes: saturated colours unlike the ones above, then golden-angle hues (_palette).
_MORE_CLASS_COLOURS = ('#ffe119', '#46f0f0', '#f032e6', '#bcf60c', '#008080', '#800000', '#808000')


# Pale colours for clusters matched to no class (then pale golden-angle hues).
_EXTRA_COLOURS = ('#aec7e8', '#ffbb78', '#98df8a', '#ff9896', '#c5b0d5', '#f7b6d2')


_AXES = ((1, 2), (0, 2), (0, 1))  # displayed (row, column) array axes of a slice across axis 0/1/2


CAPTION = (
  'Three orthogonal slices (rows). Columns: image, reference labels, jule3d, and the two intensity '
  'baselines. Cluster ids are arbitrary: each prediction is recoloured by its Hungarian match to '
  'the reference classes (same colour = matched to the same class); clusters matched to no class '
  'have colours of their own; black = 0 (not annotated in the reference, not covered or background '
  'in a prediction). Pixel aspect follows the voxel spacing.'
)


CAPTION_NO_REFERENCE = (
  'Three orthogonal slices (rows). Columns: image, jule3d, and the intensity baselines. No reference '
  "was given: jule3d's segments have one colour each, and each baseline is recoloured by its "
  "Hungarian match to jule3d's segments over the voxels jule3d labelled (same colour = matched); "
  'labels matched to none have pale colours of their own; black = 0 (not labelled). Pixel aspect '
  'follows the voxel spacing.'
)


def _rgb(hex_colour: str) -> np.ndarray:
  return np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)], np.float64) / 255


def _save(fig, path: str) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg

  FigureCanvasAgg(fig)
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, format='png', dpi=_DPI)


def slice_positions(shape, planes: np.ndarray) -> tuple[int, int, int]:
  """Where the three orthogonal slices cut the volume.

  The volume centre, except along axis 0 when the centre plane holds no annotation: then the middle
  annotated plane (references annotated on a few slices, as in the paper).

  Args:
    shape: volume shape.
    planes: annotated voxels per plane of axis 0.

  Returns:
    The plane index along axes 0, 1 and 2.
  """
  centre = [s // 2 for s in shape]
  annotated = np.flatnonzero(planes)
  if len(annotated) and not planes[centre[0]]:
    centre[0] = int(annotated[len(annotated) // 2])
  return tuple(centre)


def _cut(vol, axis: int, index: int) -> np.ndarray:
  lo, hi = [0, 0, 0], list(vol.shape)
  lo[axis], hi[axis] = index, index + 1
  return np.take(vol.read(lo, hi), 0, axis=axis)


def _paint(labels: np.ndarray, colour_of) -> np.ndarray:
  out = np.zeros(labels.shape + (3,))
  for value in np.unique(labels):
    if value:
      out[labels == value] = colour_of(int(value))
  return out


def _annotation_thickness(planes: np.ndarray, depth: int, ratios) -> list[int]:
  # A few annotated planes of a deep volume are 1-voxel lines on the axis-1/axis-2 cuts: drawn
  # with fewer than ~1.5 screen pixels per voxel, most would vanish when the panel is downsampled.
  sparse = planes.any() and (planes > 0).mean() < 0.5
  out = [1, 1, 1]
  for a in (1, 2):
    pixels_per_voxel = _PANEL_IN * 0.9 * _DPI * ratios[a] / depth
    if sparse and pixels_per_voxel < 1.5:
      out[a] = 2 * int(math.ceil(1.5 / pixels_per_voxel) // 2) + 1
  return out


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0]}' if text else type(e).__name__


def write_figures(
  workdir, image, reference, predictions, planes, scores, names, history, classes=()
) -> tuple[dict[str, str], dict[str, str]]:
  """Writes figures/slices.png and (with a training history) figures/training.png.

  A figure that fails to draw (any exception) is one warning and an entry in the errors: the
  report is written without it.

  Args:
    workdir: the run directory.
    image: the volume as the user gave it (pipeline.Inputs.input_volume).
    reference: its reference labels, or None.
    predictions: method name -> label Volume.
    planes: annotated voxels per axis-0 plane, or None without a reference.
    scores: 'nmi' (may be empty) and 'matching' (see draw_slices).
    names: reference class -> name.
    history: train_history.json content, or None.
    classes: every reference class (each keeps its colour even when absent from the slices).

  Returns:
    (figure name -> path relative to workdir, figure name -> first line of its error).
  """
  folder = os.path.join(workdir, FIGURES)
  os.makedirs(folder, exist_ok=True)
  jobs = {
    'slices': lambda path: draw_slices(
      path, image, reference, predictions, planes, scores, names, classes=classes
    )
  }
  if history and history.get('periods'):
    jobs['training'] = lambda path: draw_training(path, history)
  done, errors = {}, {}
  for name, draw in jobs.items():
    rel = f'{FIGURES}/{name}.png'
    try:
      draw(os.path.join(workdir, rel))
    except Exception as e:  # a figure is never worth the report
      errors[name] = _first_line(e)
      logging.warning('figure %s not drawn: %s', rel, errors[name])
      continue
    done[name] = rel
  return done, errors


def _palette(n: int, pale: bool = False) -> list[np.ndarray]:
  """n distinct colours: the fixed ones first, then golden-angle hues (never black or grey)."""
  fixed = _EXTRA_COLOURS if pale else _CLASS_COLOURS + _MORE_CLASS_COLOURS
  out = [_rgb(c) for c in fixed[:n]]
  for i in range(len(out), n):
    hue = (i * 0.618033988749895) % 1.0
    sat, val = (0.3, 0.97) if pale else (0.8, (0.95, 0.7)[i % 2])
    out.append(np.array(colorsys.hsv_to_rgb(hue, sat, val)))
  return out


_LEGEND_MAX = 24  # classes named in the legend; more are summarised in one entry


def draw_slices(path, image, reference, predictions, planes, scores, names, *, classes=()) -> None:
  """Image, reference and predictions on three orthogonal slices, side by side.

  Every class gets a colour of its own, however many; a predicted label takes the colour of the
  class it is matched to, unmatched labels pale colours of their own (the same in every row).

  Args:
    path: output PNG.
    image: image Volume.
    reference: reference label Volume, or None: no reference column, and the classes are jule3d's
      segments (scores['matching'] maps each baseline's labels onto them).
    predictions: method name -> label Volume (missing methods are drawn as empty panels).
    planes: annotated voxels per axis-0 plane (chooses the axis-0 slice); None: the centre.
    scores: with 'matching' (method -> {predicted label (str): class}) and optionally 'nmi'.
    names: reference class -> name.
    classes: every reference class, also those absent from the drawn slices.
  """
  from matplotlib.figure import Figure

  planes = np.zeros(image.shape[0], np.int64) if planes is None else np.asarray(planes)
  pos = slice_positions(image.shape, planes)
  cuts = [_cut(image, a, pos[a]).astype(np.float64) for a in range(3)]
  lo, hi = np.percentile(np.concatenate([c.ravel() for c in cuts]), [0.5, 99.5])
  refs = None if reference is None else [_cut(reference, a, pos[a]) for a in range(3)]
  methods = ['jule3d', *baselines.NAMES]
  methods += [m for m in predictions if m not in methods]  # the optional baselines computed
  columns = ['image', *([] if refs is None else ['reference']), *methods]
  matching = {
    m: {int(p): int(r) for p, r in ((scores.get('matching') or {}).get(m) or {}).items()}
    for m in methods
  }
  labels = {m: [_cut(predictions[m], a, pos[a]) for a in range(3)] for m in predictions}
  shown_values = {
    m: {int(v) for cut in cs for v in np.unique(cut) if v > 0} for m, cs in labels.items()
  }
  in_refs = set() if refs is None else {int(v) for r in refs for v in np.unique(r) if v > 0}
  colour, extra = _colours(classes, names, in_refs, matching, shown_values)
  sp = image.spacing
  # Rows as tall as their slices (in physical units) so elongated volumes waste no space.
  extent = [(image.shape[r] * sp[r], image.shape[c] * sp[c]) for r, c in _AXES]
  ratios = [float(np.clip(h / w, 0.15, 3.0)) for h, w in extent]
  fig = Figure(
    figsize=(_PANEL_IN * len(columns), _PANEL_IN * sum(ratios) + 1.8), layout='constrained'
  )
  axes = fig.subplots(3, len(columns), squeeze=False, gridspec_kw={'height_ratios': ratios})
  thick = _annotation_thickness(planes, image.shape[0], ratios)
  for a in (1, 2):  # annotated slices cross these cuts as lines along axis 1 / 2
    if refs is not None and thick[a] > 1:
      refs[a] = ndimage.grey_dilation(refs[a], size=(thick[a], 1))
  nmis = scores.get('nmi') or {}
  for a in range(3):
    row_ax, col_ax = _AXES[a]
    aspect = sp[row_ax] / sp[col_ax]
    for j, col in enumerate(columns):
      ax = axes[a, j]
      ax.set_xticks([])
      ax.set_yticks([])
      if col == 'image':
        ax.imshow(cuts[a], cmap='gray', vmin=lo, vmax=hi, aspect=aspect, interpolation='nearest')
      elif col == 'reference':
        ax.imshow(_paint(refs[a], colour.__getitem__), aspect=aspect, interpolation='nearest')
        if thick[a] > 1:
          ax.set_xlabel(f'annotated slices drawn {thick[a]} voxels thick', fontsize=8)
      elif col in predictions:
        pick = lambda v, m=matching[col], e=extra[col]: colour[m[v]] if v in m else e[v]
        ax.imshow(_paint(labels[col][a], pick), aspect=aspect, interpolation='nearest')
      else:
        ax.text(0.5, 0.5, 'not computed', ha='center', va='center', transform=ax.transAxes)
      if a == 0:
        nmi = nmis.get(col)
        title = TITLES.get(col, col) + ('' if nmi is None else f'\nNMI {nmi:.3f}')
        ax.set_title(title, fontsize=11)
      if j == 0:
        ax.set_ylabel(f'axis {a} = {pos[a]}')
        ax.set_xlabel(f'rows: axis {row_ax}, columns: axis {col_ax}', fontsize=8)
  drawn = in_refs | {
    matching[m][v] for m, vs in shown_values.items() for v in vs if v in matching[m]
  }
  _legend(fig, sorted(drawn), colour, extra, refs is not None, names)
  _save(fig, path)


def _colours(classes, names, in_refs, matching, shown_values):
  """A colour per class, and per method a pale one per label matched to no class (all rows)."""
  every = {int(c) for c in classes} | set(names) | in_refs
  every |= {r for match in matching.values() for r in match.values()}
  colour = dict(zip(sorted(every), _palette(len(every)), strict=True))
  extra = {}  # method -> {unmatched label: colour}, the same in all three rows
  for m, values in shown_values.items():
    unmatched = sorted(values - set(matching[m]))
    extra[m] = dict(zip(unmatched, _palette(len(unmatched), pale=True), strict=True))
  return colour, extra


def _legend(fig, drawn, colour, extra, has_reference: bool, names) -> None:
  """The legend under the panels (the drawn classes, the pale labels, 0) and the figure title."""
  from matplotlib.patches import Patch

  if not has_reference:
    text = lambda c: f'jule3d segment {c}'
  else:
    text = lambda c: f'{c}: {names.get(c, f"class {c}")}'
  handles = [Patch(color=colour[c], label=text(c)) for c in drawn[:_LEGEND_MAX]]
  if len(drawn) > _LEGEND_MAX:
    handles.append(Patch(color='w', label=f'... and {len(drawn) - _LEGEND_MAX} more'))
  if any(extra.values()):
    what = 'class' if has_reference else 'jule3d segment'
    handles.append(Patch(color=_EXTRA_COLOURS[0], label=f'labels matched to no {what} (pale)'))
  zero = '0: not annotated / not covered / background' if has_reference else '0: not labelled'
  handles.append(Patch(color='k', label=zero))
  fig.legend(handles=handles, loc='outside lower center', ncol=min(len(handles), 3), fontsize=10)
  if not has_reference:
    fig.suptitle('No reference: baselines recoloured by their Hungarian match to jule3d segments')
  else:
    fig.suptitle('Colours: each prediction recoloured by its Hungarian match to the reference')


def draw_training(path: str, history: dict) -> None:
  """Per-period cluster count, mean loss and (if known) patch NMI of phase 1.

  Args:
    path: output PNG.
    history: train_history.json content (non-empty 'periods').
  """
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator

  periods = history['periods']
  x = [p['period'] for p in periods]
  nmis = [p.get('nmi_patches') for p in periods]
  panels = 3 if any(v is not None for v in nmis) else 2
  fig = Figure(figsize=(4.5 * panels, 3.6), layout='constrained')
  axes = fig.subplots(1, panels, squeeze=False)[0]
  axes[0].plot(x, [p['clusters_end'] for p in periods], 'o-')
  axes[0].set_yscale('log')
  axes[0].set_ylabel('clusters after the period')
  axes[1].plot(x, [p['loss_mean'] for p in periods], 'o-', color='#d62728')
  axes[1].set_ylabel('mean triplet loss')
  if panels == 3:
    axes[2].plot(x, [np.nan if v is None else v for v in nmis], 'o-', color='#2ca02c', label='JULE')
    raw = history.get('nmi_patches_raw')
    if raw is not None:
      axes[2].axhline(raw, color='grey', ls='--', label='no learning (raw patches)')
    axes[2].set_ylabel('NMI of patch clusters')
    axes[2].legend(fontsize=9)
  for ax in axes:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel('period')
    ax.grid(alpha=0.3)
  fig.suptitle('Phase 1: recurrent JULE periods')
  _save(fig, path)
