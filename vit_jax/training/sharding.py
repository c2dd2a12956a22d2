"""Device mesh and shardings: how the batch and the train state are laid out.

The mesh has two axes, `data` and `fsdp`, over every device of every process.
The batch is split over both. Parameters and optimizer state are replicated
along `data` and, when `fsdp` > 1, each large array is split along `fsdp` on
its largest dimension that divides evenly (fully sharded data parallelism).
With the default `fsdp = 1` this is exactly the layout pmap gave. The train
step is the same function whatever the layout: only the shardings change.
"""

import contextlib
import functools
import math
import os
import socket
import sys
import threading
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from vit_jax.errors import UsageError

BATCH_AXES = ('data', 'fsdp')


def initialize_distributed(coordinator_address: Optional[str], num_processes: Optional[int],
                           process_id: Optional[int], auto: bool = False, timeout_s: int = 300) -> None:
  """Joins this process to a multi-process JAX run (before any other JAX call).

  With a coordinator address, the three values are used as given. With `auto`,
  JAX detects the cluster from its environment (SLURM, TPU pods, ...). A
  process still waiting for the others after `timeout_s` seconds prints one
  `error:` line saying what it waited for and exits with code 2 (JAX itself
  would abort the process with a C++ stack trace).
  """
  if not (coordinator_address or auto):
    return
  if timeout_s < 1:
    raise UsageError(f'--distributed_timeout={timeout_s}: give the seconds to wait for the other processes '
                     '(1 or more).')
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise UsageError('--coordinator_address needs --num_processes and --process_id too.')
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise UsageError(f'--num_processes={num_processes} --process_id={process_id}: the processes of a run are '
                       f'numbered 0..num_processes-1, one --process_id each.')
    waited_for = functools.partial(_waited_for, coordinator_address, num_processes, process_id)
    with _deadline(timeout_s, waited_for):
      jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                 process_id=process_id, initialization_timeout=timeout_s + 60)
  else:
    with _deadline(timeout_s, lambda: 'the other processes of the cluster JAX detected (SLURM, TPU, ...)'):
      jax.distributed.initialize(initialization_timeout=timeout_s + 60)


def _waited_for(address: str, num_processes: int, process_id: int) -> str:
  """What a process that timed out was waiting for, in words: checks whether the coordinator answers."""
  if process_id == 0:
    ids = '1' if num_processes == 2 else f'1..{num_processes - 1}'
    return (f'the other {num_processes - 1} process(es) to join the coordinator at {address}; start '
            f'them with --coordinator_address {address} --num_processes {num_processes} --process_id {ids}')
  host, _, port = address.rpartition(':')
  try:
    socket.create_connection((host.strip('[]'), int(port)), timeout=2).close()
  except (OSError, ValueError):
    return (f'process 0 (the coordinator) at {address}, where nothing answers; start process 0 there with '
            '--process_id 0, or fix --coordinator_address')
  return (f'all {num_processes} processes to join the coordinator at {address} (process 0 answers); start '
          f'the missing ones with --num_processes {num_processes} and their own --process_id')


@contextlib.contextmanager
def _deadline(timeout_s: int, waited_for: Callable[[], str]):
  """Exits the process (code 2, one `error:` line) if the body has not returned after `timeout_s` seconds."""
  def give_up():
    print(f'error: gave up after {timeout_s} s (--distributed_timeout) waiting for {waited_for()}.',
          file=sys.stderr, flush=True)
    os._exit(2)  # The main thread is blocked inside JAX's C++ client: nothing else would end it.

  timer = threading.Timer(timeout_s, give_up)
  timer.daemon = True
  timer.start()
  try:
    yield
  finally:
    timer.cancel()


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes from config.mesh, with -1 meaning 'all remaining devices'."""
  sizes = [config.mesh.data, config.mesh.fsdp]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise UsageError(f'config.mesh data={sizes[0]}, fsdp={sizes[1]}: use positive sizes, '
                     'and -1 ("the rest") for at most one axis.')
  known = math.prod(s for s in sizes if s != -1)
  if num_devices % known:
    raise UsageError(f'config.mesh data={sizes[0]}, fsdp={sizes[1]} does not divide the '
                     f'{num_devices} devices; choose sizes whose product is {num_devices}.')
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise UsageError(f'config.mesh data={sizes[0]} x fsdp={sizes[1]} = {math.prod(sizes)} devices, '
                     f'but there are {num_devices}; use -1 for one axis.')
  return sizes[0], sizes[1]


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on any process of the run (a small collective)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def make_mesh(config: ml_collections.ConfigDict, devices: Optional[list] = None) -> Mesh:
  """The (data, fsdp) mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(config, len(devices))
  if devices == jax.devices():
    # Lays out devices process-contiguously. Auto axes: shardings are given
    # at jit boundaries and XLA propagates them inside.
    return jax.make_mesh(shape, BATCH_AXES, axis_types=(AxisType.Auto,) * 2)
  return Mesh(np.asarray(devices).reshape(shape), BATCH_AXES, axis_types=(AxisType.Auto,) * 2)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
  """Splits the largest dimension divisible by `fsdp_size`; small arrays stay replicated."""
  if fsdp_size == 1 or math.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh, config: ml_collections.ConfigDict) -> Any:
  """A NamedSharding for every leaf of the (abstract) train state."""
  fsdp_size = mesh.shape['fsdp']
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp_size, config.mesh.fsdp_min_size)),
      abstract_state)


def placed(abstract: Any, shardings: Any) -> Any:
  """`abstract` (a tree of shapes and dtypes) with each leaf given its sharding: what orbax
  restores into and what `.lower()` compiles for, without allocating anything."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                      shardings)


def check_batch_size(batch_size: int, mesh: Mesh, what: str = 'config.batch_size') -> None:
  """Raises a UsageError unless the global batch splits evenly over all devices."""
  n = mesh.size
  if batch_size % n:
    raise UsageError(f'{what}={batch_size} is not divisible by the {n} devices; '
                     f'use a multiple of {n}.')


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles the global batch from each process's local share (process order = batch order)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)
