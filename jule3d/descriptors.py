"""What period 0 clusters (config.cluster.initial_features): hand-made features of the raw patches.

JULE's first clustering has no CNN to ask yet, so it clusters a fixed function of each normalised
patch. The choice decides what the CNN is then trained to separate:
  'raw'       the paper: the patch's voxels flattened and L2-normalised. L2 makes x and 2x
              identical (intensity level and contrast are divided out), the centre voxel is one of
              w^3 equal inputs, and two patches of a random-phase texture are nearly uncorrelated
              whatever their tissue: the clusters follow what IS correlated between neighbouring
              patches, the large structure around them (the specimen's border, README).
  'windowed'  the voxels times a Gaussian window centred on the patch (std w/6), not normalised:
              Euclidean distances keep intensity level and contrast and weight the centre most.
  'texture'   three phase-invariant numbers per patch: the intensity level at the centre
              (Gaussian-weighted mean, std 1 voxel) and the local energy (Gaussian-weighted standard
              deviation about the weighted mean) at two scales (std 1.5 voxels and w/6); each
              standardised over the patches clustered together.
  'cue'       one of two numbers, picked from the data (pick_cue): the centre level, or the pooled
              fine energy (the local standard deviation at std 1 voxel, averaged over the patch
              with a centred Gaussian of std w/6). Level and texture are different cues (MNI152's
              tissues differ in intensity, the phantom's regions in texture); standardised
              together, as in 'texture', each dilutes the other, and no fixed weighting serves
              both (README "Honest reading"), so the rule keeps the one the data separates.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

# 'cue': the local moments' Gaussian (std 1 voxel, the finest scale a patch resolves) is truncated
# at this radius; the energy map is pooled over the patch's inner voxels that have all their
# neighbours within it.
_FINE_SIGMA, _FINE_RADIUS = 1.0, 3


def _gauss_window(w: int, sigma: float) -> np.ndarray:
  r = np.arange(w) - w // 2
  g1 = np.exp(-0.5 * (r / sigma) ** 2)
  g = g1[:, None, None] * g1[None, :, None] * g1[None, None, :]
  return (g / g.sum()).astype(np.float32)


@jax.jit
def raw(data: jax.Array) -> jax.Array:
  """[N, w, w, w] -> [N, w^3]: flattened and L2-normalised (the paper's period-0 input)."""
  x = data.reshape(data.shape[0], -1)
  return x / (jnp.linalg.norm(x, axis=1, keepdims=True) + 1e-10)


@jax.jit
def windowed(data: jax.Array) -> jax.Array:
  """[N, w, w, w] -> [N, w^3]: voxels times a centred Gaussian window (std w/6), max weight 1."""
  w = data.shape[1]
  g = _gauss_window(w, w / 6.0)
  g = g / g.max()
  return (data * g).reshape(data.shape[0], -1)


def texture_scales(w: int) -> tuple[float, float, float]:
  """Window stds of the 'texture' descriptor: centre level, fine energy, coarse energy."""
  return 1.0, 1.5, max(w / 6.0, 1.5)


@jax.jit
def texture_raw(data: jax.Array) -> jax.Array:
  """[N, w, w, w] -> [N, 3] (level, fine energy, coarse energy), not yet standardised."""
  w = data.shape[1]
  s_level, s_fine, s_coarse = texture_scales(w)
  x = data.reshape(data.shape[0], -1)
  out = [x @ _gauss_window(w, s_level).reshape(-1)]
  for s in (s_fine, s_coarse):
    g = _gauss_window(w, s).reshape(-1)
    m = x @ g
    out.append(jnp.sqrt(jnp.maximum((x * x) @ g - m * m, 0.0)))
  return jnp.stack(out, axis=1)


def texture_volume(values: np.ndarray, w: int) -> np.ndarray:
  """texture_raw of the patch centred on every voxel, by separable Gaussian filters: [Z, Y, X, 3].

  The patch windows are the filters truncated at w // 2 and normalised over that support, so at
  every centre whose patch lies inside the volume this equals texture_raw of that patch (up to
  float rounding); elsewhere the volume is mirrored. Whole-volume memory (several float32 copies):
  for the quality benchmark's hand-made ablation, not for lung-size volumes.

  Args:
    values: [Z, Y, X] normalised intensities.
    w: patch edge.

  Returns:
    float32 [Z, Y, X, 3] (level, fine energy, coarse energy).
  """
  x = np.asarray(values, np.float64)
  s_level, s_fine, s_coarse = texture_scales(w)
  out = [_smooth_volume(x, s_level, w // 2)]
  out += [_local_std_volume(x, s, w // 2) for s in (s_fine, s_coarse)]
  return np.stack(out, axis=-1).astype(np.float32)


def _smooth_volume(a: np.ndarray, sigma: float, radius: int) -> np.ndarray:
  """Separable Gaussian of a whole volume, truncated at `radius`, mirrored at the faces."""
  from scipy import ndimage

  for axis in range(3):
    a = ndimage.gaussian_filter1d(a, sigma, axis=axis, mode='mirror', radius=radius)
  return a


def _local_std_volume(x: np.ndarray, sigma: float, radius: int) -> np.ndarray:
  """Gaussian-weighted standard deviation about the Gaussian-weighted mean at every voxel."""
  m = _smooth_volume(x, sigma, radius)
  return np.sqrt(np.maximum(_smooth_volume(x * x, sigma, radius) - m * m, 0.0))


def _gauss_1d(sigma: float, radius: int) -> np.ndarray:
  g = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  return g / g.sum()


def _valid_smooth(x: jax.Array, g: np.ndarray) -> jax.Array:
  """Separable VALID correlation of [N, a, b, c] with the 1-D kernel g on the three voxel axes."""
  r = len(g) // 2
  for axis in (1, 2, 3):
    n = x.shape[axis] - 2 * r
    x = sum(float(g[k]) * jax.lax.slice_in_dim(x, k, k + n, axis=axis) for k in range(len(g)))
  return x


def cue_scales(w: int) -> tuple[float, float]:
  """'cue' window stds: the centre level's and the energy pooling's (the 'texture' coarse scale)."""
  return 1.0, max(w / 6.0, 1.5)


@jax.jit
def cue_raw(data: jax.Array) -> jax.Array:
  """[N, w, w, w] -> [N, 2]: the centre level and the pooled fine energy (not yet standardised).

  The fine energy is the local standard deviation in a Gaussian window of std 1 voxel (the finest
  scale), computed at the patch's inner voxels (those whose window lies inside the patch); the
  pooled energy is its mean over those voxels weighted by a centred Gaussian (std w/6). A texture's
  energy is measured where it lives and then averaged, so that a level change or a region edge in
  the window reads far less as texture than in a standard deviation over the whole window.
  """
  w = data.shape[1]
  s_level, s_pool = cue_scales(w)
  x = data.reshape(data.shape[0], -1)
  level = x @ _gauss_window(w, s_level).reshape(-1)
  g = _gauss_1d(_FINE_SIGMA, _FINE_RADIUS)
  m = _valid_smooth(data, g)
  energy = jnp.sqrt(jnp.maximum(_valid_smooth(data * data, g) - m * m, 0.0))
  inner = w - 2 * _FINE_RADIUS
  pool = _gauss_window(inner, s_pool).reshape(-1)
  return jnp.stack([level, energy.reshape(data.shape[0], -1) @ pool], axis=1)


def cue_volume(values: np.ndarray, w: int) -> np.ndarray:
  """cue_raw of the patch centred on every voxel, by separable filters: [Z, Y, X, 2].

  Equal to cue_raw at every centre whose patch lies inside the volume (up to float rounding);
  elsewhere the volume is mirrored. Whole-volume memory: for the hand-made ablation.
  """
  x = np.asarray(values, np.float64)
  s_level, s_pool = cue_scales(w)
  level = _smooth_volume(x, s_level, w // 2)
  energy = _local_std_volume(x, _FINE_SIGMA, _FINE_RADIUS)
  pooled = _smooth_volume(energy, s_pool, w // 2 - _FINE_RADIUS)
  return np.stack([level, pooled], axis=-1).astype(np.float32)


def unexplained(column: np.ndarray, k: int, seed: int = 0, max_fit: int = 20_000) -> float:
  """Share of a column's variance that 1-D k-means with k clusters leaves (0 = k tight groups)."""
  from sklearn.cluster import KMeans

  col = np.asarray(column, np.float64).reshape(-1, 1)
  if len(col) > max_fit:
    col = col[np.random.default_rng(seed).choice(len(col), max_fit, replace=False)]
  var = col.var()
  if var <= 0:
    return 1.0
  km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(col)
  return float(km.inertia_ / (len(col) * var))


def pick_cue(feats: np.ndarray, k: int) -> tuple[int, list[float]]:
  """The 'cue' rule: the column whose k-means leaves the least of its variance.

  A cue that separates k tissues forms k tight groups along its axis; one that only varies
  (noise, a gradient) leaves most of its variance whatever the split. The rule has no parameter:
  on the phantom it picks the energy (regions differ in texture), on MNI152 the level (tissues
  differ in intensity); README gives the measured ratios.

  Returns:
    (the column's index, every column's `unexplained` share).
  """
  ratios = [unexplained(feats[:, j], k) for j in range(feats.shape[1])]
  return int(np.argmin(ratios)), ratios


def standardise(f: np.ndarray) -> np.ndarray:
  """Each column to mean 0, std 1 (a constant column stays 0)."""
  f = np.asarray(f, np.float64)
  sd = f.std(axis=0)
  return ((f - f.mean(axis=0)) / np.where(sd > 0, sd, 1.0)).astype(np.float32)


def function(kind: str):
  """The jitted per-batch part of a kind: [N, w, w, w] -> [N, D] (before `finish`)."""
  fn = {'raw': raw, 'windowed': windowed, 'texture': texture_raw, 'cue': cue_raw}.get(kind)
  if fn is None:
    raise ValueError(f'unknown initial features {kind!r}')
  return fn


def volume_function(kind: str):
  """The whole-volume form of a kind ('texture' or 'cue'): [Z, Y, X] -> [Z, Y, X, D], equal to
  `function(kind)` of the patch centred on each voxel (before `finish`)."""
  fn = {'texture': texture_volume, 'cue': cue_volume}.get(kind)
  if fn is None:
    raise ValueError(f'initial features {kind!r} have no whole-volume form')
  return fn


def finish(kind: str, feats: np.ndarray, k: int = 3) -> np.ndarray:
  """The whole-set part of a kind: 'texture' columns standardised over the set; 'cue' the column
  pick_cue chooses for k segments, standardised; others as they are."""
  feats = np.asarray(feats, np.float32)
  if kind == 'cue':
    j, ratios = pick_cue(feats, k)
    logging.info(
      "cue: k-means leaves %s of (level, fine energy)'s variance: the %s",
      np.round(ratios, 3).tolist(),
      ('level', 'fine energy')[j],
    )
    return standardise(feats[:, j : j + 1])
  return standardise(feats) if kind == 'texture' else feats


def initial_features(kind: str, data: jax.Array, to_host=jax.device_get, k: int = 3) -> np.ndarray:
  """Period-0 features of normalised patches (module docstring).

  Args:
    kind: config.cluster.initial_features ('raw', 'windowed' or 'texture').
    data: [N, w, w, w] normalised patches (device or host; may be split over processes).
    to_host: gathers a (possibly sharded) device array to one numpy array.

  Returns:
    [N, D] float32 numpy array.
  """
  return finish(kind, to_host(function(kind)(data)), k)
