"""What specimen masking's fill does to the texture cue at the rim, per voxel on the phantom.

For the built-in phantom (seed 0) at each size, the pooled fine energy of jule3d/descriptors.py (the
period-0 cue the rule picks on the phantom) is computed around every voxel of the volume as the CNN
would see it: unmasked, with the outside filled by the specimen's mean (`outside_fill='mean'`) and
by its mirror image (`'mirror'`, the recommended method). k-means (K = 3) of that one number per
voxel is scored (NMI, geometric) on every voxel of the phantom's 7 annotated slices, beside the
phantom's hand-made reference `phantom.texture_feature` (local std of the foreground voxels). No
CNN: this isolates the fill.

  python bench/outside_fill.py
"""

import argparse
import os
import sys
import tempfile

import numpy as np
from sklearn.cluster import KMeans

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import demo  # noqa: E402
from jule3d import descriptors, phantom, specimen, volume  # noqa: E402
from jule3d.train import patch_nmi  # noqa: E402


def _score(values: np.ndarray, truth: np.ndarray, where: np.ndarray) -> float:
  x = descriptors.standardise(values.reshape(-1, 1)[where].astype(np.float64))
  return patch_nmi(truth.ravel()[where], KMeans(3, n_init=4, random_state=0).fit_predict(x))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--sizes', default='96,128')
  a = p.parse_args(argv)
  c = demo.get_config()
  w, threshold, block = c.patches.patch_size, c.data.threshold, c.patches.outside_block
  print('| phantom | unmasked | mean fill | mirror fill | phantom.texture_feature |')
  print('|---|---|---|---|---|')
  for n in (int(v) for v in a.sizes.split(',')):
    image, full = phantom.make_phantom((n, n, n), c.data.phantom_seed)
    truth = phantom.annotate_slices(full)
    where = np.flatnonzero(truth.ravel() > 0)
    row = []
    with tempfile.TemporaryDirectory() as tmp:
      volume.save_zarr(os.path.join(tmp, 'image.zarr'), image, (1.0, 1.0, 1.0))
      vol = volume.open_volume(os.path.join(tmp, 'image.zarr'))
      row.append(image)
      for fill in ('mean', 'mirror'):
        masked = specimen.masked_volume(
          vol, threshold, 'above', block, os.path.join(tmp, fill), fill_mode=fill, reach=w
        )
        row.append(masked.read((0, 0, 0), masked.shape))
    cells = [_score(descriptors.cue_volume(v, w)[..., 1], truth, where) for v in row]
    cells.append(_score(phantom.texture_feature(image, threshold), truth, where))
    print(f'| {n}^3 | ' + ' | '.join(f'{v:.3f}' for v in cells) + ' |', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
