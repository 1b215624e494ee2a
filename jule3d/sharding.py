"""Data parallelism over all local devices: batches split along axis 0, parameters replicated.

One 1-D mesh named 'batch' over `jax.devices()`; jit then partitions the train step and the
feature extraction itself (BatchNorm statistics and the triplet loss stay global over the batch).
A batch whose size the device count does not divide is left replicated rather than padded, so
results never depend on the device count through padding. On one device everything is a no-op.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def mesh() -> Mesh:
  """A 1-D 'batch' mesh over every device (automatic sharding semantics).

  Returns:
    The mesh.
  """
  return jax.make_mesh((jax.device_count(),), ('batch',), axis_types=(jax.sharding.AxisType.Auto,))


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
