"""XLA:CPU's instruction scheduler, chosen per program so that a train step fits in host memory.

XLA:CPU runs a program's independent operations concurrently, and its
default scheduler orders them for that concurrency: more buffers are alive at
once. For a ViT train step that plans about 45% more temporaries than the
memory-optimised scheduler (ViT-B/16 at batch 64: 14.77 GiB against 10.20;
ViT-Ti/16 at batch 64: 3.72 against 2.57), for 0-3.5% more speed
(docs/performance.md). A step that does not fit is killed by the kernel's
out-of-memory killer, with no message (B/16 at batch 64 on a 24 GiB machine,
beside another large process).

`compile_within_memory` compiles with the default and keeps it when its plan
fits in the host memory that is free; otherwise it compiles again with the
memory-optimised scheduler (a per-program compiler option, so nothing else in
the process changes). When even that plan cannot fit in free memory and
swap, it raises a UsageError that says by how much and what to change,
before the first step, instead of being killed in it.

`config.cpu_scheduler` ('auto', 'concurrency' or 'memory') chooses; an
`--xla_cpu_scheduler_type` in XLA_FLAGS is left to stand. GPU and TPU
programs are compiled as they are: their memory is the device's, which XLA
plans itself.
"""

import os
from typing import Any, Callable, NamedTuple, Optional

from vit_jax.errors import UsageError

CHOICES = ('auto', 'concurrency', 'memory')
OPTION = 'xla_cpu_scheduler_type'
MEMORY_OPTIMIZED = {OPTION: 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}
CONCURRENCY_OPTIMIZED = {OPTION: 'CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED'}
# Share of the free memory a step's plan may take before 'auto' switches: the process also
# holds the input pipeline's buffers and the runtime's own, which the plan does not count.
HEADROOM = 0.85
GIB = 2.0**30


def check_choice(choice: str) -> None:
  """Raises UsageError unless `choice` is one of CHOICES (config.cpu_scheduler)."""
  if choice not in CHOICES:
    raise UsageError(f'config.cpu_scheduler={choice!r}; use one of {", ".join(map(repr, CHOICES))}.')


def _meminfo(path: str) -> dict[str, int]:
  """Fields of /proc/meminfo in bytes; {} where there is none (not Linux)."""
  try:
    with open(path) as f:
      lines = f.read().splitlines()
  except OSError:
    return {}
  values = {}
  for line in lines:
    name, _, rest = line.partition(':')
    parts = rest.split()
    if parts and parts[0].isdigit():
      values[name] = int(parts[0]) * (1024 if parts[1:] == ['kB'] else 1)
  return values


def _cgroup_free(root: str, membership: str) -> Optional[int]:
  """Bytes left under this process's cgroup (v2) memory limit, or None without a limit.

  `membership` is /proc/self/cgroup, whose '0::PATH' line names the cgroup under `root`.
  """
  try:
    with open(membership) as f:
      relative = next((line.strip().split(':', 2)[2] for line in f if line.startswith('0::')), None)
  except (OSError, IndexError):
    return None
  if relative is None:
    return None
  folder = os.path.join(root, relative.lstrip('/'))
  try:
    with open(os.path.join(folder, 'memory.max')) as f:
      limit = f.read().strip()
    with open(os.path.join(folder, 'memory.current')) as f:
      current = int(f.read().strip())
  except (OSError, ValueError):
    return None
  return None if limit == 'max' else max(int(limit) - current, 0)


def free_host_memory(meminfo: str = '/proc/meminfo', cgroup_root: str = '/sys/fs/cgroup',
                     cgroup_membership: str = '/proc/self/cgroup') -> tuple[Optional[int], int]:
  """(free bytes, free swap bytes) of this host for this process; (None, 0) where unknown.

  Free bytes are the kernel's MemAvailable (free and reclaimable memory), or less
  where a cgroup limit leaves less.
  """
  info = _meminfo(meminfo)
  available = info.get('MemAvailable')
  limit = _cgroup_free(cgroup_root, cgroup_membership)
  if limit is not None:
    available = limit if available is None else min(available, limit)
  return available, info.get('SwapFree', 0)


def planned_bytes(compiled: Any, local_devices: int) -> int:
  """Host bytes a compiled CPU program allocates when it runs: its temporaries on each local device."""
  analysis = compiled.memory_analysis()
  return 0 if analysis is None else int(analysis.temp_size_in_bytes) * local_devices


def _size(size: int) -> str:
  return f'{size / GIB:.2f} GiB' if size >= 0.1 * GIB else f'{size / 2**20:.1f} MiB'


class Compiled(NamedTuple):
  """A compiled program and the scheduler it was compiled with."""
  program: Any
  memory_optimized: bool
  reason: str  # Which scheduler and why, for the run's log.


def compile_within_memory(lowered: Any, *, platform: str, local_devices: int = 1, choice: str = 'auto',
                          fix: str = '', free: Optional[tuple[Optional[int], int]] = None,
                          agree: Callable[[bool], bool] = bool) -> Compiled:
  """`lowered` (a jax Lowered train step) compiled with the scheduler `choice` allows, see above.

  `local_devices` is how many of the program's devices run in this process (each
  allocates its own temporaries from the host). `fix` ends the error when the
  step cannot fit (which config keys lower its memory). `free` is (free bytes,
  free swap bytes), measured now when None. `agree` turns this process's yes or
  no into every process's (any of them): all processes compile one program.
  """
  check_choice(choice)
  if platform != 'cpu':
    return Compiled(lowered.compile(), False, f'{platform}: XLA plans its memory')
  if OPTION in os.environ.get('XLA_FLAGS', ''):
    return Compiled(lowered.compile(), False, 'the scheduler XLA_FLAGS sets')
  if choice == 'memory':
    return Compiled(lowered.compile(MEMORY_OPTIMIZED), True, "memory-optimised (config.cpu_scheduler='memory')")
  if choice == 'concurrency':
    return Compiled(lowered.compile(CONCURRENCY_OPTIMIZED), False,
                    "concurrency-optimised (config.cpu_scheduler='concurrency')")
  available, swap = free if free is not None else free_host_memory()
  compiled = lowered.compile()
  need = planned_bytes(compiled, local_devices)
  if not agree(available is not None and need > HEADROOM * available):
    return Compiled(compiled, False, f'concurrency-optimised, XLA:CPU\'s default ({_size(need)} planned'
                    + ('' if available is None else f', {_size(available)} free') + ')')
  default_need = need
  compiled = lowered.compile(MEMORY_OPTIMIZED)
  need = planned_bytes(compiled, local_devices)
  too_big = available is not None and need > available + swap
  if agree(too_big):
    if not too_big:
      raise UsageError('The train step does not fit in the host memory of another process of this run; '
                       'its error says by how much.')
    raise UsageError(f'The train step needs {_size(need)} of host memory (XLA\'s plan, with its '
                     f'memory-optimised scheduler) and this host has {_size(available)} free'
                     + (f' and {_size(swap)} of swap' if swap else '')
                     + f'; it would be killed for memory. {fix or "Lower the batch size."} '
                     "(config.cpu_scheduler='memory' runs it anyway.)")
  free_text = 'another process\'s free memory' if available is None else f'{_size(available)} free'
  return Compiled(compiled, True, f'memory-optimised ({_size(need)} planned): the default plans '
                  f'{_size(default_need)}, more than {HEADROOM:.0%} of {free_text}')
