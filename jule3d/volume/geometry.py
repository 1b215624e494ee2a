"""Spacing and affine (jule3d.volume docstring, "Geometry"): the file's kept, a given one checked."""

import math
from collections.abc import Sequence

import numpy as np
from absl import logging

from jule3d.errors import UserError

_SPACING_RTOL = 1e-4  # a given spacing "agrees" with the file's within this relative error per axis


_LPS = np.diag([-1.0, -1.0, 1.0])  # ITK's LPS world <-> NIfTI's RAS world (its own inverse)


def _spacing_fields(name: str) -> tuple[str, str, str]:
  # How messages name the spacing, override and expected-spacing inputs: config fields for a
  # configured input, open_volume's arguments otherwise.
  if '.' in name:
    return ('config.data.spacing', 'config.data.spacing_override', 'config.data.expected_spacing')
  return ('spacing', 'spacing_override', 'expected_spacing')


def _fmt(values: Sequence[float]) -> str:
  return '(' + ', '.join(f'{float(v):.6g}' for v in values) + ')'


def _close(a: Sequence[float], b: Sequence[float], rtol: float = _SPACING_RTOL) -> bool:
  return all(abs(x - y) <= rtol * max(abs(x), abs(y)) for x, y in zip(a, b, strict=True))


def affine_spacing(affine: np.ndarray) -> tuple[float, float, float]:
  """The voxel spacing an affine implies: the lengths of its first three columns.

  Args:
    affine: 4x4 voxel-to-world matrix.

  Returns:
    One spacing per array axis.
  """
  return tuple(float(n) for n in np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0))


def _geometry(file_spacing, affine, given, override, expected, where, fields):
  """(spacing, affine, Volume.geometry) from what the file carries and what the caller gave."""
  if affine is not None:
    norms = affine_spacing(affine)
    if not all(math.isfinite(n) and n > 0 for n in norms) or not np.isfinite(affine).all():
      logging.warning(
        '%s: its affine %s is degenerate (an axis of length 0): ignored, the volume is treated as '
        'carrying no geometry.',
        where,
        np.asarray(affine).tolist(),
      )
      affine, file_spacing = None, None
    else:
      if file_spacing is not None and not _close(file_spacing, norms):
        logging.warning(
          "%s: its spacing attribute %s differs from its affine's column lengths %s: the affine's "
          'are used.',
          where,
          _fmt(file_spacing),
          _fmt(norms),
        )
      file_spacing = norms
  if file_spacing is not None:
    if given is not None and override:
      logging.warning(
        "%s: %s = %s replaces the file's voxel spacing %s (%s=True; direction and origin kept).",
        where,
        fields[0],
        _fmt(given),
        _fmt(file_spacing),
        fields[1],
      )
      return given, (None if affine is None else _rescale_affine(affine, given)), 'override'
    if given is not None and not _close(given, file_spacing):
      advice = (
        f"remove {fields[0]} to use the file's, or set {fields[1]}=True to replace it"
        if '.' in fields[0]
        else f"pass {fields[0]}=() to use the file's, or {fields[1]}=True to replace it"
      )
      raise UserError(
        f'{fields[0]} = {_fmt(given)} differs from the voxel spacing {_fmt(file_spacing)} in the '
        f'header of {where}: {advice}.'
      )
    if given is None and expected is not None and not _close(expected, file_spacing):
      logging.warning(
        "%s has voxel spacing %s (from the file), not %s (%s, this config's paper volume): fine "
        "for your own data, the file's is used; check the threshold suits it.",
        where,
        _fmt(file_spacing),
        _fmt(expected),
        fields[2],
      )
    return tuple(file_spacing), affine, 'file'
  if given is not None:
    return given, None, 'config'
  if expected is not None:
    return expected, None, 'expected'
  logging.warning(
    '%s carries no voxel spacing: using 1.0 per axis; set %s to its voxel edges (one per array '
    'axis) if they matter.',
    where,
    fields[0],
  )
  return (1.0, 1.0, 1.0), None, 'default'


def _check_spacing(spacing, what: str, allow_empty: bool = True) -> tuple[float, ...] | None:
  try:
    values = tuple(float(s) for s in spacing)
  except (TypeError, ValueError):
    values = None
  if values == () and allow_empty:
    return None
  if values is None or len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
    alternative = ', or () to read it from the file' if allow_empty else ''
    raise UserError(f'{what}: expected 3 positive numbers (one per array axis){alternative}.')
  return values


def _rescale_affine(affine: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
  # Keep the direction and origin, make the column lengths the (possibly overridden) spacing.
  affine = np.array(affine, dtype=np.float64)
  norms = np.linalg.norm(affine[:3, :3], axis=0)
  if np.all(norms > 0):
    affine[:3, :3] *= np.asarray(spacing, dtype=np.float64) / norms
  return affine


def _output_geometry(spacing: Sequence[float], affine) -> tuple[np.ndarray, list[float]]:
  """(affine, spacing) an output is written with: the affine as given, else diag(spacing)."""
  if affine is None:
    spacing = [float(s) for s in spacing]
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
      raise ValueError(f'expected 3 positive spacings, got {tuple(spacing)}')
    return np.diag([*spacing, 1.0]), spacing
  affine = np.array(affine, dtype=np.float64)
  if affine.shape != (4, 4) or not np.isfinite(affine).all():
    raise ValueError(f'expected a finite 4x4 affine, got {affine.tolist()}')
  spacing = list(affine_spacing(affine))
  if not all(s > 0 for s in spacing):
    raise ValueError(f'the affine has an axis of length 0: {affine.tolist()}')
  return affine, spacing
