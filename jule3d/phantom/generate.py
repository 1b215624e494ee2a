"""The phantom's image and ground truth: specimen, three regions, their densities, PSF, noise."""

import dataclasses
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
