"""ANTs Atropos, the classical tissue-segmentation peer, as the reports' third baseline (optional).

Atropos (Avants et al., Neuroinformatics 2011) is what a user would otherwise run: k-means
initialisation, a Gaussian mixture on intensity and a Markov random field prior (weight
`MRF_WEIGHT` over the 1x1x1-voxel neighbourhood), fitted by EM inside the foreground mask. It comes
from antspyx, whose wheels need an older numpy and scipy than jule3d's pins, so it lives in its own
virtualenv `.venv-ants` (requirements-ants.txt; `make demo` and `make mni152` create it when they
can) and runs as a subprocess (jule3d/atropos_worker.py) on NIfTI copies of the image and the mask.
Where that interpreter is missing the baseline is skipped with one log line; `JULE3D_ANTS_PYTHON`
names another interpreter with antspyx. ITK needs the whole volume in memory, so volumes above
`config.evaluate.atropos_max_voxels` are skipped too. Results are stored like the other baselines
(baselines/atropos.zarr, reused while the settings match).
"""

import math
import os
import shutil
import subprocess
import time

import numpy as np
from absl import logging

from jule3d import baselines, files, patches, volume

NAME = 'atropos'
MRF_WEIGHT = 0.3  # Atropos' usual smoothing for brain MRI (`-m [0.3,1x1x1]`)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'atropos_worker.py')


def interpreter() -> str | None:
  """The Python with antspyx: $JULE3D_ANTS_PYTHON, else the repository's .venv-ants, else None."""
  path = os.environ.get('JULE3D_ANTS_PYTHON') or os.path.join(_ROOT, '.venv-ants', 'bin', 'python')
  return path if os.access(path, os.X_OK) else None


def atropos_baseline(image, config, out_dir: str, overwrite: bool = False) -> dict:
  """Computes (or reuses) the Atropos label volume out_dir/atropos.zarr.

  Args:
    image: the image Volume.
    config: the run config (segment.num_segments, data.threshold/foreground, evaluate.atropos*).
    out_dir: folder of the baseline stores.
    overwrite: recompute even when a valid store exists.

  Returns:
    {'path', 'reused', 'mrf', 'seconds'} or {'skipped': reason}.
  """
  c = config
  if not c.evaluate.atropos:
    return {'skipped': 'off (config.evaluate.atropos = False)'}
  py = interpreter()
  if py is None:
    reason = 'antspyx not installed (make mni152, or a .venv-ants from requirements-ants.txt)'
    logging.info('Atropos baseline skipped: %s', reason)
    return {'skipped': reason}
  voxels = math.prod(image.shape)
  if voxels > c.evaluate.atropos_max_voxels:
    reason = (
      f'{voxels} voxels > config.evaluate.atropos_max_voxels = {c.evaluate.atropos_max_voxels}'
    )
    logging.info('Atropos baseline skipped: %s', reason)
    return {'skipped': reason}
  k = int(c.segment.num_segments)
  settings = {**baselines.baseline_settings(image, c), 'method': NAME, 'mrf': MRF_WEIGHT}
  for unused in ('seed', 'max_fit', 'restarts'):  # k-means settings: Atropos uses none of them
    settings.pop(unused)
  path = os.path.join(out_dir, f'{NAME}.zarr')
  stored = baselines.stored_baseline(path, settings)
  if stored and not overwrite:
    return {'path': path, 'reused': True, **stored['result']}
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.time()
  # A temporary name that files.remove_stale_temporaries knows: a killed run leaves nothing behind.
  work = files.temp_path(os.path.join(out_dir, f'{NAME}-work'))
  os.mkdir(work)
  try:
    arr = image.read((0, 0, 0), image.shape)
    mask = patches.foreground(arr, c.data.threshold, c.data.foreground)
    io_paths = [os.path.join(work, f) for f in ('image.nii', 'mask.nii', 'out.nii')]
    volume.write_nifti(io_paths[0], arr.astype(np.float32), image.spacing, image.affine)
    volume.write_nifti(io_paths[1], mask.astype(np.uint8), image.spacing, image.affine)
    del arr
    # ants.atropos writes its K probability images to the temporary directory and never removes
    # them (~2 MB a run on the demo, ~12 MB on MNI152): point it at `work`, removed below.
    proc = subprocess.run(
      [py, _WORKER, *io_paths, str(k), str(MRF_WEIGHT)],
      capture_output=True,
      text=True,
      env={**os.environ, 'TMPDIR': work},
    )
    if proc.returncode != 0:
      tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
      logging.warning('Atropos baseline failed (exit %d): %s', proc.returncode, tail)
      return {'skipped': f'Atropos failed: {tail}'}
    import nibabel as nib

    labels = np.asarray(nib.load(io_paths[2]).dataobj).astype(np.uint8)
    labels[~mask] = 0
    result = {'mrf': MRF_WEIGHT, 'seconds': round(time.time() - t0, 3)}
    volume.save_zarr(
      path, labels, image.spacing, image.affine,
      jule3d_baseline={'settings': settings, 'result': result},
    )  # fmt: skip
  finally:
    shutil.rmtree(work, ignore_errors=True)
  logging.info('Atropos baseline (MRF %.2g): %.1fs', MRF_WEIGHT, time.time() - t0)
  return {'path': path, 'reused': False, **result}
