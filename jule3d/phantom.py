"""Synthetic micro-CT lung specimen with ground truth: the built-in demo and test data.

The paper's volumes (method §1, §6) are micro-CT scans of lung specimens holding invasive carcinoma,
non-invasive carcinoma and normal tissue. This phantom imitates them in the way that matters for
the method: the three classes differ in TEXTURE, not in intensity.

Image: uint16 in scanner-like raw units. Air (outside the specimen and inside alveoli) is ~1000,
tissue ~2000-5000 (foreground mean ~3000), Gaussian noise of std 80 after a Gaussian PSF. The
foreground threshold is `THRESHOLD` = 2000 (`>= 2000` is specimen tissue) for every seed and
shape: air stays below it by more than 10 noise stds, and ~70-95 % of each region's voxels pass.

Labels (uint8):
  0  background: air outside the specimen
  1  normal tissue: alveolar foam, thin dense walls (~1.8 voxels before blur) around air spaces
     ~6-9 voxels across (Voronoi/Worley foam, cell pitch 9)
  2  non-invasive carcinoma: the same foam with thickened walls (~2.8 voxels) and the air spaces
     partly filled (low-density material, below the threshold)
  3  invasive carcinoma: solid tissue with a mottled density (fine and coarse random fields)

The specimen is a smooth random blob with air around it. The three regions are sectors around an
axis close to array axis 0 (so most axial slices show all three) with noisy boundaries; each holds
25-50 % of the specimen. Per-region densities are calibrated so that the regions' mean intensity
over all voxels and over foreground voxels agree within ~8 %, while the local std (7^3 window)
falls from normal (~830) over non-invasive (~550) to invasive (~350): intensity k-means on the
foreground cannot separate the regions (NMI < 0.1), a local-std texture feature can (NMI ~0.6-0.7
at 96^3-128^3); `region_statistics` and `separability` measure this. All lengths are in voxels,
so the texture looks the same in a 13-27 voxel patch whatever the volume's shape.

CLI (skips the work when the outputs already exist for the same arguments):
  python -m jule3d.phantom --out DIR --shape 96,96,96 --seed 0 [--spacing 0.03,0.03,0.03] [--stats]
"""

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from jule3d.errors import UserError

THRESHOLD = 2000  # Foreground threshold in phantom units (`image >= THRESHOLD` is tissue).
AIR = 1000.0  # Air intensity before noise.
LABEL_NAMES = {
  0: 'background (air outside the specimen)',
  1: 'normal tissue',
  2: 'non-invasive carcinoma',
  3: 'invasive carcinoma',
}
MIN_SIZE = 24  # Smaller volumes cannot hold three foam regions of cell pitch ~9.
NUM_ANNOTATED_SLICES = 7  # The paper's evaluation annotated 7 slices.
# Part of the cache record: bump it whenever the generator's output changes for the same arguments.
VERSION = 1
_META = 'phantom.json'


@dataclasses.dataclass(frozen=True)
class PhantomParams:
  """Knobs of `make_phantom`; lengths in voxels, intensities in phantom units."""

  cell_size: float = 9.0  # Alveolar cell pitch (air space + wall).
  wall_thickness: float = 1.8  # Normal alveolar wall, before the PSF.
  thick_wall: float = 2.8  # Non-invasive (thickened) wall, before the PSF.
  fill_level: float = 0.25  # Non-invasive air spaces: filled to this fraction of wall density.
  mottle_scale: float = 3.0  # Invasive fine mottle: correlation length.
  mottle_std: float = 250.0  # Invasive fine mottle: density std.
  coarse_scale: float = 10.0  # Invasive coarse mottle: correlation length.
  coarse_std: float = 500.0  # Invasive coarse mottle: density std (some dips below threshold).
  mean_intensity: float = 2800.0  # Target mean over all voxels of a region (times the ratio below).
  region_mean_ratio: tuple[float, float, float] = (0.96, 1.0, 1.03)  # Classes 1, 2, 3.
  psf_sigma: float = 0.8  # Gaussian point-spread function std.
  noise_std: float = 80.0  # Additive Gaussian noise std (after the PSF).
  boundary_noise: float = 0.12  # Specimen outline irregularity (fraction of its radius).
  region_noise: float = 0.1  # Region boundary displacement (fraction of the smallest edge).
  margin: int = 3  # Minimum air voxels between the specimen and the volume's faces.


def make_phantom(shape: Sequence[int], seed: int, **knobs: float) -> tuple[np.ndarray, np.ndarray]:
  """Generates the phantom image and its ground-truth labels.

  Deterministic: the same shape, seed and knobs give identical arrays (on the same numpy/BLAS).
  Peak memory is about 30 bytes per voxel (256^3: ~0.5 GB).

  Args:
    shape: (z, y, x) voxels, each at least MIN_SIZE; odd and non-cubic shapes are fine.
    seed: any non-negative integer.
    **knobs: overrides of PhantomParams fields.

  Returns:
    (image, labels): uint16 image in phantom units (see THRESHOLD), uint8 labels (LABEL_NAMES).

  Raises:
    UserError: bad shape, seed or knob.
  """
  shape = _check_shape(shape, 'make_phantom shape')
  seed = _check_seed(seed, 'make_phantom seed')
  p = _params(knobs)
  # Independent streams per component: a knob of one part does not reshuffle the others.
  rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(7)]

  specimen, centre = _specimen(rngs[0], shape, p)
  labels = _regions(rngs[1], shape, specimen, centre, p)
  del specimen
  density = _density(rngs[2:6], shape, labels, p)
  image = ndimage.gaussian_filter(density, p.psf_sigma, mode='nearest')
  del density
  image += p.noise_std * rngs[6].standard_normal(shape, dtype=np.float32)
  np.rint(image, out=image)
  np.clip(image, 0, np.iinfo(np.uint16).max, out=image)
  return image.astype(np.uint16), labels


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


def write_phantom(
  outdir: str,
  shape: Sequence[int],
  seed: int,
  spacing: Sequence[float] = (0.03, 0.03, 0.03),
  **knobs: float,
) -> dict[str, str]:
  """Writes image.zarr, labels.zarr and labels_annotated.zarr (7 axial slices) under outdir.

  Skips the generation when outdir already holds the three stores from the same arguments (they
  are recorded in outdir/phantom.json, written last, so an interrupted run is redone).

  Args:
    outdir: output folder (created if needed).
    shape: (z, y, x) voxels.
    seed: phantom seed.
    spacing: voxel edge per axis (mm) stored with the volumes.
    **knobs: overrides of PhantomParams fields.

  Returns:
    Paths by name: 'image', 'labels', 'labels_annotated', 'meta'.

  Raises:
    UserError: bad arguments or an unwritable outdir.
  """
  shape = _check_shape(shape, 'write_phantom shape')
  seed = _check_seed(seed, 'write_phantom seed')
  try:
    spacing = tuple(float(s) for s in spacing)
  except (TypeError, ValueError):
    spacing = ()
  if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
    raise UserError(f'write_phantom spacing={spacing}: expected 3 positive numbers.')
  params = _params(knobs)
  paths = {
    name: os.path.join(outdir, f'{name}.zarr') for name in ('image', 'labels', 'labels_annotated')
  }
  paths['meta'] = os.path.join(outdir, _META)
  record = {
    'version': VERSION,
    'shape': list(shape),
    'seed': seed,
    'spacing': list(spacing),
    'params': dataclasses.asdict(params),
    'threshold': THRESHOLD,
    'labels': {str(k): v for k, v in LABEL_NAMES.items()},
    'annotated_slices_axis0': annotation_positions(shape[0]).tolist(),
  }
  record['params']['region_mean_ratio'] = list(params.region_mean_ratio)
  if _up_to_date(paths, record):
    return paths

  from jule3d import volume  # lazily: the writer pulls in tensorstore

  try:
    os.makedirs(outdir, exist_ok=True)
    if os.path.exists(paths['meta']):
      os.remove(paths['meta'])  # the stores below are about to change: no stale record
  except OSError as e:
    raise UserError(f'phantom output folder {outdir!r}: {e.strerror}.') from None
  image, labels = make_phantom(shape, seed, **knobs)
  volume.save_zarr(paths['image'], image, spacing=spacing)
  volume.save_zarr(paths['labels'], labels, spacing=spacing)
  volume.save_zarr(paths['labels_annotated'], annotate_slices(labels), spacing=spacing)
  tmp = paths['meta'] + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, paths['meta'])
  return paths


def region_statistics(
  image: np.ndarray, labels: np.ndarray, threshold: float = THRESHOLD, window: int = 7
) -> dict[int, dict[str, float]]:
  """Per-region intensity and texture statistics (the phantom's design targets).

  Args:
    image: 3D image.
    labels: 3D labels, 0 = background.
    threshold: foreground threshold (`image >= threshold`).
    window: edge of the cubic window of the local std.

  Returns:
    For each label present except 0: 'share' (of all labelled voxels), 'foreground_fraction',
    'mean_all', 'mean_foreground', 'local_std' (mean over the region of the window std).
  """
  img = np.asarray(image, np.float32)
  local_std = _local_std(img, window)
  fg = img >= threshold
  total = np.count_nonzero(labels)
  stats = {}
  for k in np.unique(labels):
    if k == 0:
      continue
    region = labels == k
    stats[int(k)] = {
      'share': float(np.count_nonzero(region) / total),
      'foreground_fraction': float(fg[region].mean()),
      'mean_all': float(img[region].mean()),
      'mean_foreground': float(img[region & fg].mean()) if (region & fg).any() else float('nan'),
      'local_std': float(local_std[region].mean()),
    }
  return stats


def texture_feature(image: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
  """A one-number-per-voxel texture feature: local std of the foreground voxels.

  The std of the `>= threshold` voxels in a 5^3 window, averaged over a 7^3 window. Restricting it
  to foreground voxels keeps the air outside the specimen from making the specimen's surface look
  like alveolar foam; the alveolar air itself still shows as the walls' blurred profiles.

  Args:
    image: 3D image.
    threshold: foreground threshold.

  Returns:
    float32 array of the image's shape.
  """
  img = np.asarray(image, np.float32)
  m = (img >= threshold).astype(np.float32)
  count = np.maximum(ndimage.uniform_filter(m, 5), 1e-6)
  mean = ndimage.uniform_filter(img * m, 5) / count
  mean_sq = ndimage.uniform_filter(img * img * m, 5) / count
  std = np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))
  return ndimage.uniform_filter(std, 7)


def separability(
  image: np.ndarray,
  labels: np.ndarray,
  threshold: float = THRESHOLD,
  max_voxels: int = 50_000,
  seed: int = 0,
) -> dict[str, float]:
  """NMI of 3-means on foreground intensity and on `texture_feature`, vs the labels.

  Scored on labelled foreground voxels (a seeded subsample of at most `max_voxels`), with
  sklearn's geometric-mean NMI as in method §6.

  Args:
    image: 3D image.
    labels: 3D labels, 0 = background (not scored).
    threshold: foreground threshold.
    max_voxels: subsample size for k-means.
    seed: subsample and k-means seed.

  Returns:
    {'intensity_nmi': ..., 'texture_nmi': ...}.
  """
  from sklearn.cluster import KMeans
  from sklearn.metrics import normalized_mutual_info_score

  img = np.asarray(image, np.float32)
  where = np.flatnonzero((img >= threshold) & (labels > 0))
  rng = np.random.default_rng(seed)
  if where.size > max_voxels:
    where = np.sort(rng.choice(where, max_voxels, replace=False))
  truth = labels.ravel()[where]
  out = {}
  for name, values in (('intensity', img), ('texture', texture_feature(img, threshold))):
    x = values.ravel()[where].astype(np.float64)[:, None]
    pred = KMeans(3, n_init=4, random_state=seed).fit_predict((x - x.mean()) / x.std())
    out[f'{name}_nmi'] = float(
      normalized_mutual_info_score(truth, pred, average_method='geometric')
    )
  return out


def main(argv: Sequence[str] | None = None) -> int:
  """Command line: writes the phantom (see the module docstring).

  Args:
    argv: arguments without the program name (default: sys.argv[1:]).

  Returns:
    Exit status: 0, or 2 after a one-line error on stderr.
  """
  ap = argparse.ArgumentParser(prog='python -m jule3d.phantom', description=__doc__.split('\n')[0])
  ap.add_argument('--out', required=True, help='output folder')
  ap.add_argument('--shape', default='96,96,96', help='z,y,x voxels (default 96,96,96)')
  ap.add_argument('--seed', type=int, default=0, help='phantom seed (default 0)')
  ap.add_argument('--spacing', default='0.03,0.03,0.03', help='voxel edge per axis, mm')
  ap.add_argument('--stats', action='store_true', help='print region statistics and NMIs')
  args = ap.parse_args(argv)
  try:
    shape = _parse_tuple(args.shape, int, '--shape')
    spacing = _parse_tuple(args.spacing, float, '--spacing')
    paths = write_phantom(args.out, shape, args.seed, spacing=spacing)
    print(json.dumps(paths, indent=1))
    if args.stats:
      image, labels = make_phantom(shape, args.seed)
      print(json.dumps({'regions': region_statistics(image, labels)}, indent=1))
      print(json.dumps(separability(image, labels), indent=1))
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


# --- generation -------------------------------------------------------------------------------


def _specimen(rng, shape, p):
  """Smooth random blob with at least `margin` air voxels to every face; returns (mask, centre)."""
  n = np.array(shape, np.float64)
  centre = (n - 1) / 2 + rng.uniform(-0.02, 0.02, 3) * n
  room = np.minimum(centre, n - 1 - centre) - p.margin
  radius = room / (1 + 0.5 * p.boundary_noise) * rng.uniform(0.9, 1.0, 3)
  u = [
    _axis_vector(((np.arange(s) - centre[i]) / radius[i]).astype(np.float32), i)
    for i, s in enumerate(shape)
  ]
  # A rounded superellipsoid (exponent 2.2) fills the box better than an ellipsoid.
  r = (np.abs(u[0]) ** 2.2 + np.abs(u[1]) ** 2.2 + np.abs(u[2]) ** 2.2) ** (1 / 2.2)
  wobble = _smooth_noise(rng, shape, max(shape) / 4) + 0.35 * _smooth_noise(rng, shape, 6.0)
  wobble /= np.abs(wobble).max()
  mask = r + p.boundary_noise * wobble < 1.0
  components, count = ndimage.label(mask)
  if count > 1:  # a stray island of the noisy outline is not part of the specimen
    sizes = np.bincount(components.ravel())[1:]
    mask = components == (np.argmax(sizes) + 1)
  mask = ndimage.binary_fill_holes(mask)
  # The outline rarely reaches the margin; where it does, the specimen is cut flat (real ones are).
  inner = tuple(slice(p.margin, s - p.margin) for s in shape)
  cut = np.zeros(shape, bool)
  cut[inner] = mask[inner]
  return cut, centre


def _regions(rng, shape, specimen, centre, p):
  """Three sectors around an axis near array axis 0, with noisy boundaries, random shares."""
  axis = np.array([1.0, *rng.uniform(-0.4, 0.4, 2)])
  axis /= np.linalg.norm(axis)
  e1 = np.cross(axis, rng.standard_normal(3))
  e1 /= np.linalg.norm(e1)
  e2 = np.cross(axis, e1)
  x = [_axis_vector(np.arange(s) - centre[i], i).astype(np.float32) for i, s in enumerate(shape)]
  amplitude = p.region_noise * min(shape)
  scale = max(shape) / 5
  # Displacements of two scales: wavy boundaries that are also rough at the patch scale.
  a = x[0] * e1[0] + x[1] * e1[1] + x[2] * e1[2] + amplitude * _smooth_noise(rng, shape, scale)
  b = x[0] * e2[0] + x[1] * e2[1] + x[2] * e2[2] + amplitude * _smooth_noise(rng, shape, scale)
  a += 1.5 * _smooth_noise(rng, shape, 5.0)
  b += 1.5 * _smooth_noise(rng, shape, 5.0)
  angle = np.arctan2(b, a)[specimen]
  del a, b
  shares = 0.25 + 0.25 * rng.dirichlet(np.ones(3))  # each in [0.25, 0.5]
  cuts = np.quantile(angle, np.cumsum(shares)[:2])
  classes = rng.permutation(3).astype(np.uint8) + 1  # which class gets which sector
  labels = np.zeros(shape, np.uint8)
  labels[specimen] = classes[np.searchsorted(cuts, angle, side='right')]
  return labels


def _density(rngs, shape, labels, p):
  """Pre-PSF density: air outside, a texture per region, each calibrated to its target mean."""
  wall_gap = _foam_wall_gap(rngs[0], shape, p.cell_size)
  density = np.full(shape, AIR, np.float32)
  ratios = p.region_mean_ratio

  # Occupancy in [0, 1] (1 = wall tissue) with a one-voxel soft edge against aliasing.
  region = labels == 1
  occ = np.clip(p.wall_thickness / 2 + 0.5 - wall_gap[region], 0.0, 1.0)
  density[region] = _calibrated(occ, p.mean_intensity * ratios[0])

  region = labels == 2
  thickness = p.thick_wall * (1 + 0.1 * _smooth_noise(rngs[1], shape, 4.0)[region])
  occ = np.maximum(np.clip(thickness / 2 + 0.5 - wall_gap[region], 0.0, 1.0), p.fill_level)
  density[region] = _calibrated(occ, p.mean_intensity * ratios[1])
  del wall_gap, occ, thickness

  region = labels == 3
  fine = _standardise(_smooth_noise(rngs[2], shape, p.mottle_scale)[region])
  coarse = _standardise(_smooth_noise(rngs[3], shape, p.coarse_scale)[region])
  density[region] = p.mean_intensity * ratios[2] + p.mottle_std * fine + p.coarse_std * coarse
  return density


def _calibrated(occupancy, target_mean):
  # Wall density chosen so the region's mean (air + occupancy * (wall - air)) is the target: the
  # regions' mean intensities then match whatever their porosity.
  mean = max(float(occupancy.mean()), 1e-3)
  return (AIR + (target_mean - AIR) / mean * occupancy).astype(np.float32)


def _foam_wall_gap(rng, shape, cell):
  """Half the gap F2 - F1 of Worley noise on a jittered grid: ~distance to the nearest wall.

  One seed per grid cell of edge `cell`, jittered by 80 % of the cell: the nearest two seeds of a
  voxel lie in the 27 cells around its own, so 27 vectorised passes give F1 and F2 exactly
  (slab by slab, to bound memory).
  """
  grid = tuple(int((s - 1) // cell) + 3 for s in shape)  # one cell of padding on each side
  jitter = 0.8 * (rng.random((*grid, 3), dtype=np.float32) - 0.5)
  seeds = (np.moveaxis(np.indices(grid, dtype=np.float32), 0, -1) - 0.5 + jitter) * cell
  seeds = seeds.reshape(-1, 3)
  coords = [np.arange(s, dtype=np.float32) for s in shape]
  cells = [(c // cell).astype(np.int64) + 1 for c in coords]
  out = np.empty(shape, np.float32)
  step = max(1, (1 << 21) // (shape[1] * shape[2]))  # ~2M voxels per slab
  for z0 in range(0, shape[0], step):
    zs = slice(z0, min(z0 + step, shape[0]))
    f1 = np.full(out[zs].shape, np.inf, np.float32)
    f2 = np.full(out[zs].shape, np.inf, np.float32)
    for dz in (-1, 0, 1):
      gz = (cells[0][zs] + dz)[:, None, None]
      for dy in (-1, 0, 1):
        gy = (cells[1] + dy)[None, :, None]
        for dx in (-1, 0, 1):
          gx = (cells[2] + dx)[None, None, :]
          seed = seeds[(gz * grid[1] + gy) * grid[2] + gx]
          d = (coords[0][zs, None, None] - seed[..., 0]) ** 2
          d += (coords[1][None, :, None] - seed[..., 1]) ** 2
          d += (coords[2][None, None, :] - seed[..., 2]) ** 2
          np.minimum(f2, np.maximum(f1, d), out=f2)
          np.minimum(f1, d, out=f1)
    out[zs] = (np.sqrt(f2) - np.sqrt(f1)) / 2
  return out


def _smooth_noise(rng, shape, scale):
  """Zero-mean, unit-std Gaussian random field with correlation length ~`scale` voxels.

  White noise on a grid `scale` times coarser, interpolated by a separable Gaussian kernel (three
  small matrix products): as smooth as a large Gaussian filter at a fraction of its cost.
  """
  coarse_shape = tuple(int(np.ceil(s / scale)) + 4 for s in shape)
  field = rng.standard_normal(coarse_shape, dtype=np.float32)
  for axis, s in enumerate(shape):
    pos = np.arange(s, dtype=np.float32) / scale + 2.0
    kernel = np.exp(-0.5 * ((pos[:, None] - np.arange(coarse_shape[axis])) / 0.8) ** 2)
    field = np.moveaxis(np.tensordot(kernel.astype(np.float32), field, axes=(1, axis)), 0, axis)
  return _standardise(field)


def _standardise(x):
  x = x - x.mean()
  return x / max(float(x.std()), 1e-12)


def _axis_vector(v, axis):
  return v.reshape([-1 if i == axis else 1 for i in range(3)])


def _local_std(img, window):
  mean = ndimage.uniform_filter(img, window)
  mean_sq = ndimage.uniform_filter(img * img, window)
  return np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))


# --- validation and caching -------------------------------------------------------------------


def _check_shape(shape, what):
  try:
    dims = tuple(int(s) for s in shape)
    ok = len(dims) == 3 and all(d == s for d, s in zip(dims, shape, strict=True))
  except (TypeError, ValueError):
    ok = False
  if not ok or min(dims) < MIN_SIZE:
    raise UserError(f'{what}={shape!r}: expected 3 integers, each >= {MIN_SIZE} voxels.')
  return dims


def _check_seed(seed, what):
  if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
    raise UserError(f'{what}={seed!r}: expected a non-negative integer.')
  return int(seed)


def _params(knobs):
  names = {f.name for f in dataclasses.fields(PhantomParams)}
  unknown = sorted(set(knobs) - names)
  if unknown:
    raise UserError(
      f'phantom knob(s) {", ".join(unknown)}: unknown; expected some of {", ".join(sorted(names))}.'
    )
  p = PhantomParams(**knobs)
  ratios = tuple(p.region_mean_ratio)
  if len(ratios) != 3 or min(ratios) <= 0:
    raise UserError(f'phantom knob region_mean_ratio={ratios}: expected 3 positive numbers.')
  positive = ('cell_size', 'wall_thickness', 'thick_wall', 'mottle_scale', 'coarse_scale')
  for name in positive + ('mean_intensity', 'psf_sigma'):
    if not getattr(p, name) > 0:
      raise UserError(f'phantom knob {name}={getattr(p, name)!r}: expected a positive number.')
  for name in ('mottle_std', 'coarse_std', 'noise_std', 'boundary_noise', 'region_noise'):
    if not getattr(p, name) >= 0:
      raise UserError(f'phantom knob {name}={getattr(p, name)!r}: expected a number >= 0.')
  if not 0 <= p.fill_level < 1:
    raise UserError(f'phantom knob fill_level={p.fill_level!r}: expected 0 <= fill_level < 1.')
  if p.mean_intensity * min(ratios) <= AIR:
    raise UserError(
      f"phantom knob mean_intensity={p.mean_intensity!r}: expected the regions' means above air "
      f'({AIR:g}).'
    )
  return dataclasses.replace(p, region_mean_ratio=ratios)


def _up_to_date(paths, record):
  try:
    with open(paths['meta']) as f:
      if json.load(f) != record:
        return False
  except (OSError, ValueError):
    return False
  return all(os.path.isdir(paths[k]) for k in ('image', 'labels', 'labels_annotated'))


def _parse_tuple(text, kind, flag):
  try:
    values = tuple(kind(v) for v in text.split(','))
  except ValueError:
    values = ()
  if len(values) != 3:
    raise UserError(f'{flag}={text!r}: expected three comma-separated numbers, e.g. 96,96,96.')
  return values


if __name__ == '__main__':
  sys.exit(main())
