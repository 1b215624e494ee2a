"""Runs ANTs Atropos on one volume; executed by jule3d/atropos.py with the .venv-ants interpreter.

Not imported by jule3d (it runs under another virtualenv, with antspyx and an older numpy):
  python atropos_worker.py IMAGE.nii.gz MASK.nii.gz OUT.nii.gz K MRF_WEIGHT
Atropos (Avants et al. 2011): k-means initialisation, then a Gaussian mixture with a Markov
random field prior of weight MRF_WEIGHT over the 1x1x1-voxel neighbourhood, 5 EM iterations,
inside the mask. Writes uint8 labels 1..K inside the mask, 0 outside.
"""

import sys


def main(argv):
  import ants
  import numpy as np

  image_path, mask_path, out_path, k, mrf = argv
  img = ants.image_read(image_path, pixeltype='float')
  mask = ants.image_read(mask_path, pixeltype='unsigned int')
  seg = ants.atropos(
    a=img, x=mask, i=f'kmeans[{int(k)}]', m=f'[{float(mrf)},1x1x1]', c='[5,0]', verbose=0
  )
  labels = seg['segmentation'].numpy().astype(np.uint8)
  ants.image_write(
    ants.from_numpy(labels, origin=img.origin, spacing=img.spacing, direction=img.direction).clone(
      'unsigned char'
    ),
    out_path,
  )
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
