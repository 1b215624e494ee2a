"""Volumes in and out (method §1): open any supported format via tensorstore, convert once, write.

The package, one job per module:
  core       the Volume (a read-only tensorstore with its geometry) and what every module shares
  geometry   spacing and affine: the file's kept, a given spacing checked against it
  open       `open_volume`: find the kind of input, open it in place or through its converted copy;
             `derived_copy` (a volume the pipeline computes, written once and opened)
  sources    formats read by numpy, nibabel and tifffile, streamed slab by slab
  itk        NRRD, MetaImage and DICOM series through SimpleITK
  convert    the conversion cache: one chunked zarr copy per source file version
  write      every atomic volume writer (zarr, NIfTI, NRRD/MetaImage), on jule3d.files' temp names
  integrity  identity digests, same-grid checks, read errors as one-line messages

`open_volume` accepts
  * a zarr v2 / zarr v3 / N5 array folder, or a tensorstore JSON spec (a `.json` file, or inline
    text starting with '{'): opened IN PLACE, read-only, never copied. Spacing comes from the
    attribute 'spacing' (N5 also 'resolution' / 'pixelResolution'); an 'affine' attribute is kept.
    Chunks missing from the store read as the fill value (tensorstore's rule), without an error.
  * `.nii` / `.nii.gz`, `.nrrd` / `.nhdr` (3D Slicer's default), `.mha` / `.mhd`, a folder holding
    one DICOM series, a multi-page `.tif` / `.tiff`, a folder of 2D TIFF slices (one per index of
    axis 0, natural sort: slice2 before slice10), `.npy`: converted ONCE into a chunked blosc/zstd
    zarr v2 under `cache_dir`, slab by slab, so a volume larger than RAM converts. The cache name
    hashes the absolute path, size and mtime of every source file (an edited file is converted
    again); the copy is written under a temporary name and renamed, so the cache never holds a
    partial volume. Superseded copies are not deleted (a running job may still read them).

How each converted format is streamed (memory: a few slabs of `chunk` planes):
  * NIfTI: the header is parsed by nibabel, the voxels are read sequentially along the last array
    axis (the slowest on disk), so even a `.nii.gz` streams in one pass instead of loading whole;
    scl_slope / scl_inter are applied as nibabel does. The affine is nibabel's `image.affine`.
  * NRRD, MetaImage, DICOM: read by SimpleITK (ITK's readers, GDCM for DICOM), WHOLE: memory of one
    copy of the volume. Headers are read first (every DICOM file's), the voxels only on conversion.
    A detached header (.nhdr, .mhd) is stamped with its data file. A DICOM folder must hold exactly
    one series (SeriesInstanceUID); its slices are ordered by position along the slice normal (not
    by file name) and must be evenly spaced. DICOM voxels are what ITK gives: rescale slope /
    intercept applied by GDCM, so CT comes out in HU with the pixel type ITK chooses for them.
  * multi-page TIFF: memory-mapped when uncompressed and contiguous, else read page by page; other
    layouts (e.g. one compressed page holding the whole volume) are loaded whole. ImageJ files give
    their spacing (z from 'spacing', y/x from the resolution tags); other TIFFs carry none.
  * TIFF folder: one file per plane; every file's header is checked before anything is converted.
  * `.npy`: memory-mapped (`mmap_mode='r'`), read along its slowest axis.

Axes are the array axes as stored: NIfTI's (i, j, k), and the same ITK index order (i, j, k) =
(x, y, z) for NRRD, MetaImage and DICOM (the transpose of SimpleITK's numpy [z, y, x] view). Integer
and float dtypes are kept as they are (CT int16 with negative values included); bool becomes uint8.
A 4D+ image whose extra trailing axes all have size 1 is accepted as 3D. Stores are translated so
that every axis starts at 0.

Geometry: the file's is the truth. `Volume.affine` is the 4x4 voxel-to-world matrix in NIfTI's RAS
convention (ITK's LPS direction / origin / spacing converted: A[:3, :3] = diag(-1, -1, 1) @ direction
@ diag(spacing), A[:3, 3] = diag(-1, -1, 1) @ origin), and `Volume.spacing` its column lengths. A
spacing given to `open_volume` (config.data.spacing) applies only to an input that carries none; one
that disagrees with the file's is refused unless `spacing_override` (then it replaces the file's,
direction and origin kept). `Volume.geometry` says where the spacing came from.

Writers: `save_zarr` (an in-memory array), `create_zarr` + `commit_zarr` or the `zarr_writer`
context manager (outputs streamed slab by slab), `write_nifti`, `write_itk` (.nrrd, .nhdr, .mha,
.mhd). All are atomic: the final name never holds a partial volume. Outputs carry 'spacing' (and
'affine') attributes or header fields that `open_volume` reads back unchanged.
"""

from jule3d.volume.core import GEOMETRIES, SUPPORTED, Volume, read_ahead
from jule3d.volume.geometry import affine_spacing
from jule3d.volume.integrity import (
  check_same_grid,
  identity,
  read_errors,
  same_grid,
  validate_volume,
)
from jule3d.volume.open import derived_copy, open_volume
from jule3d.volume.write import (
  ITK_SUFFIXES,
  commit_zarr,
  create_zarr,
  save_zarr,
  write_itk,
  write_nifti,
  zarr_writer,
)

__all__ = [
  'GEOMETRIES',
  'ITK_SUFFIXES',
  'SUPPORTED',
  'Volume',
  'affine_spacing',
  'check_same_grid',
  'commit_zarr',
  'create_zarr',
  'derived_copy',
  'identity',
  'open_volume',
  'read_ahead',
  'read_errors',
  'same_grid',
  'save_zarr',
  'validate_volume',
  'write_itk',
  'write_nifti',
  'zarr_writer',
]
