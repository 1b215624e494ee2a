"""Data parallelism: batches split along axis 0 over the devices, parameters replicated.

One 1-D mesh named 'batch' over `jax.devices()` (every device of every process); jit then
partitions the train step and the feature extraction itself (BatchNorm statistics and the triplet
loss stay global over the batch). A batch whose size the device count does not divide is left
replicated rather than padded, so results never depend on the device count through padding. On one
device everything is a no-op.

Several processes (multi-host, `config.distributed`): `initialize` joins them through
`jax.distributed`; the training patches are then a global array whose rows each process reads for
its own devices only (`put_rows`), host copies of sharded results are gathered (`to_host`), and
only the primary process writes shared files (`is_primary`, `barrier`).
"""

from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def initialize(cfg: ml_collections.ConfigDict) -> None:
  """Joins the processes of a multi-host run (config.distributed); nothing for one process.

  Must run before any JAX computation. coordinator 'auto' lets JAX read the cluster environment
  (SLURM, TPU pods, ...); otherwise 'host:port' of process 0, with num_processes and process_id.

  Args:
    cfg: config.distributed.
  """
  if cfg.coordinator != 'auto' and int(cfg.num_processes) <= 1:
    return
  # CPU collectives across processes go through gloo (GPU and TPU have their own).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if cfg.coordinator == 'auto':
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(
      coordinator_address=cfg.coordinator,
      num_processes=int(cfg.num_processes),
      process_id=int(cfg.process_id),
    )
  logging.info(
    'process %d of %d: %d local of %d devices',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def is_primary() -> bool:
  """True in the process that writes shared files (process 0; always true on one process)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op on one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def primary_says(flag: bool) -> bool:
  """Process 0's `flag` on every process: a decision every process must take alike (one made from
  host float sums, whose last bits may differ between hosts)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def to_host(x: jax.Array | np.ndarray) -> np.ndarray:
  """A full host copy of `x`, gathered from the other processes where it is split across them."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def sum_over_processes(values: np.ndarray) -> np.ndarray:
  """Elementwise float64 sum of `values` over the processes (exact to ~1e-14 relative).

  Collectives carry float32 unless x64 is on, so each float64 travels as a (high, low) float32 pair.
  """
  values = np.asarray(values, np.float64)
  if jax.process_count() == 1:
    return values
  hi = values.astype(np.float32)
  lo = (values - hi.astype(np.float64)).astype(np.float32)
  both = np.asarray(multihost_utils.process_allgather(np.stack([hi, lo])), np.float64)
  return both.sum(axis=(0, 1))


def mesh(local: bool = False) -> Mesh:
  """A 1-D 'batch' mesh (automatic sharding semantics).

  Args:
    local: only this process's devices (for work each process does on its own data, e.g. its share
      of the segmentation grid); default every device of every process.

  Returns:
    The mesh.
  """
  devices = jax.local_devices() if local else jax.devices()
  return jax.make_mesh(
    (len(devices),), ('batch',), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
  )


def row_sharding(m: Mesh, n: int) -> NamedSharding:
  """How the n training patches are laid out: split over the processes when there are several
  (each reads only its rows) and the device count divides n, else a full copy on every device."""
  if jax.process_count() > 1:
    return batch_sharding(m, n)
  return replicated(m)


def put_rows(
  shape: tuple[int, ...], s: NamedSharding, read: Callable[[np.ndarray], np.ndarray]
) -> jax.Array:
  """A global [n, ...] array built from `read(rows)` for the rows of this process's devices only.

  Args:
    shape: the global shape.
    s: its sharding (split along axis 0, or replicated).
    read: row indices -> those rows (host array).

  Returns:
    The global array.
  """
  cache = {}

  def shard(index):
    rows = np.arange(shape[0])[index[0]]
    key = (int(rows[0]), len(rows)) if len(rows) else (0, 0)
    if key not in cache:
      cache[key] = read(rows)
    return cache[key]

  return jax.make_array_from_callback(shape, s, shard)


def local_rows(shape: tuple[int, ...], s: NamedSharding) -> np.ndarray:
  """Sorted row indices of axis 0 held by this process's devices under `s`."""
  index_map = s.addressable_devices_indices_map(shape)
  rows = [np.arange(shape[0])[idx[0]] for idx in index_map.values()]
  return np.unique(np.concatenate(rows)) if rows else np.zeros(0, np.int64)


def replicated(m: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device (parameters, optimiser state).

  Args:
    m: the mesh.

  Returns:
    The sharding.
  """
  return NamedSharding(m, PartitionSpec())


def batch_sharding(m: Mesh, batch_size: int) -> NamedSharding:
  """Splits axis 0 over the devices when they divide `batch_size`, else replicates.

  Args:
    m: the mesh.
    batch_size: leading dimension of the arrays to place.

  Returns:
    The sharding.
  """
  if batch_size % m.devices.size == 0:
    return NamedSharding(m, PartitionSpec('batch'))
  return replicated(m)


def put_batch(x: np.ndarray | jax.Array, m: Mesh) -> jax.Array:
  """Places one batch on the devices, split along axis 0 where possible.

  Args:
    x: the batch.
    m: the mesh.

  Returns:
    The device array.
  """
  return jax.device_put(x, batch_sharding(m, x.shape[0]))
