"""Device mesh and shardings: how the batch and the train state are laid out.

The default mesh has one axis, `data`, over every device of every process:
the batch is split along it and parameters are replicated, which is the
layout pmap gave, expressed with `jax.jit` and `NamedSharding`.
"""

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vit_jax.errors import UsageError


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """A mesh over all devices with the axis sizes of `config.mesh` (-1: the rest)."""
  devices = jax.devices()
  size = config.mesh.data
  if size == -1:
    size = len(devices)
  if size != len(devices):
    raise UsageError(f'config.mesh.data={config.mesh.data} does not match the {len(devices)} '
                     'devices; use -1 for all of them.')
  return Mesh(np.asarray(devices).reshape(size), ('data',))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`."""
  return NamedSharding(mesh, P('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, what: str = 'config.batch_size') -> None:
  """Raises a UsageError unless the global batch splits evenly over the data axis."""
  n = mesh.shape['data']
  if batch_size % n:
    raise UsageError(f'{what}={batch_size} is not divisible by the {n} devices of the data axis; '
                     f'use a multiple of {n}.')


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles the global batch from each process's local share (process order = batch order)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)
