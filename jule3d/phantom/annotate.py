"""The annotated slices: labels kept on a few evenly spaced planes, as the paper's annotators drew."""

import numpy as np

from jule3d.errors import UserError

NUM_ANNOTATED_SLICES = 7  # The paper's evaluation annotated 7 slices.


def annotation_positions(size: int, num_slices: int = NUM_ANNOTATED_SLICES) -> np.ndarray:
  """Indices of `num_slices` evenly spaced slices, neither the first nor the last.

  Args:
    size: length of the axis.
    num_slices: how many slices.

  Returns:
    int64 array of `num_slices` distinct, increasing indices in [1, size - 2].

  Raises:
    UserError: when the axis is too short to hold that many inner slices.
  """
  if num_slices < 1 or size < num_slices + 2:
    raise UserError(
      f'annotate_slices: num_slices={num_slices} on an axis of {size} voxels: expected '
      f'1 <= num_slices <= {max(size - 2, 0)} (the edge slices are never annotated).'
    )
  # The ends of linspace are the volume's faces, which the paper's annotators avoid.
  return np.rint(np.linspace(0, size - 1, num_slices + 2)[1:-1]).astype(np.int64)


def annotate_slices(
  labels: np.ndarray, num_slices: int = NUM_ANNOTATED_SLICES, axis: int = 0
) -> np.ndarray:
  """The 'annotated slices only' reference: labels kept on a few slices, 0 elsewhere.

  Args:
    labels: 3D label volume.
    num_slices: annotated slices (the paper: 7), evenly spaced, not at the edges.
    axis: the axis the slices are perpendicular to.

  Returns:
    A new array like `labels`, equal to it on the chosen slices and 0 elsewhere.

  Raises:
    UserError: labels not 3D, bad axis or too many slices.
  """
  labels = np.asarray(labels)
  if labels.ndim != 3:
    raise UserError(f'annotate_slices: labels have shape {labels.shape}: expected a 3D volume.')
  if not -3 <= axis < 3:
    raise UserError(f'annotate_slices: axis={axis}: expected 0, 1 or 2.')
  keep = annotation_positions(labels.shape[axis], num_slices)
  out = np.zeros_like(labels)
  index = [slice(None)] * 3
  index[axis] = keep
  out[tuple(index)] = labels[tuple(index)]
  return out
