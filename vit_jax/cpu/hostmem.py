"""Host memory: keep what a step frees for the next step instead of returning it to the OS.

XLA:CPU allocates each execution's temporaries with malloc and frees them
when the execution ends: for a ViT train step that is one block of hundreds
of megabytes to gigabytes (2 GiB for ViT-Ti/16 at batch 32). glibc serves
blocks that large with mmap and gives them back with munmap (and XLA's
threads allocate from their own arenas, which do the same). So every
step faults all of its memory back in, one zeroed 4 KiB page at a time: on a
2-core CPU that was 566,000 page faults and about a second of kernel time per
ViT-Ti/16 step at batch 32, a fifth of its CPU time (docs/performance.md).

`retain_freed_memory` tells glibc to serve every thread from the main heap
(`M_ARENA_MAX` 1), never to use mmap for large blocks (`M_MMAP_MAX` 0) and
never to trim the heap (`M_TRIM_THRESHOLD` maximal): the first steps grow the
heap to the program's peak, and later steps reuse it without a fault. It also
turns off JAX's asynchronous dispatch on CPU, so a step's call returns once
the step has run and freed its temporaries: with dispatch ahead, the next
step allocated its block while the last one's was still held, and the heap
grew by a block each time that happened (2.6 GiB became 8.5 GiB for
ViT-Ti/16 at batch 32). On CPU the caller has nothing to do meanwhile (the
input pipeline runs in its own threads), and programs over several devices
stay asynchronous (JAX's flag applies to single-device programs only).

The cost is that the process keeps its peak footprint until it exits, which a
training or benchmark process reaches anyway. Set VIT_JAX_RETAIN_HOST_MEMORY=0
to keep glibc's and JAX's defaults. Other C libraries (musl, macOS) are left
alone.

All of this was measured on the CPU backend, whose computations allocate
from the host heap. On GPU and TPU hosts the device memory is XLA's own and
the host only feeds batches, so a process that will use an accelerator (its
JAX_PLATFORMS names one, or without JAX_PLATFORMS a JAX CUDA, ROCm or TPU
plugin is installed) is left alone too; `JAX_PLATFORMS=cpu` opts a GPU host's
CPU run back in. `reason()` says what the last call decided and why.
"""

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
from typing import Optional

ENV = 'VIT_JAX_RETAIN_HOST_MEMORY'

# mallopt parameters of glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

# Modules of JAX's accelerator plugins (`jax[cuda12]`, `jax[cuda13]`, ROCm, `jax[tpu]`): the one list,
# which `vit-jax devices` reports from too (`installed_accelerator_plugins`).
ACCELERATOR_MODULES = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin',
                       'jax_rocm7_plugin', 'libtpu')
ACCELERATOR_PLATFORMS = ('cuda', 'gpu', 'rocm', 'tpu')

_retaining = False
_reason = 'not called'


def is_glibc() -> bool:
  """Whether this process runs on Linux with glibc, the one allocator `retain_freed_memory` switches."""
  return platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc'


def retaining() -> bool:
  """Whether `retain_freed_memory` has switched this process's allocator."""
  return _retaining


def reason() -> str:
  """What the last `retain_freed_memory` call did and why, in a few words."""
  return _reason


def installed_accelerator_plugins() -> list[str]:
  """The JAX accelerator plugins installed, found without importing them or JAX.

  The modules of `ACCELERATOR_MODULES` that Python finds, then the other
  `jax_plugins` entry points (by name), which JAX loads too.
  """
  found = []
  for module in ACCELERATOR_MODULES:
    try:
      if importlib.util.find_spec(module) is not None:
        found.append(module)
    except (ImportError, ValueError):
      continue
  for entry in importlib.metadata.entry_points(group='jax_plugins'):
    if entry.value.split(':')[0].split('.')[0] not in found:
      found.append(entry.name)
  return found


def accelerator_in_use(environ: Optional[dict] = None) -> Optional[str]:
  """Why this process will run JAX on an accelerator, or None if it will use the CPU.

  Decided without importing JAX (which would create its backends): from
  JAX_PLATFORMS if set, else from the accelerator plugins installed
  (`installed_accelerator_plugins`), which JAX prefers over the CPU when
  present.
  """
  environ = os.environ if environ is None else environ
  platforms = [p.strip().lower() for p in environ.get('JAX_PLATFORMS', '').split(',') if p.strip()]
  if platforms:
    named = [p for p in platforms if p in ACCELERATOR_PLATFORMS]
    return f'JAX_PLATFORMS={environ["JAX_PLATFORMS"]} names {named[0]}' if named else None
  plugins = installed_accelerator_plugins()
  if not plugins:
    return None
  kind = 'accelerator plugin' if plugins[0] in ACCELERATOR_MODULES else 'plugin'
  return f'the JAX {kind} {plugins[0]} is installed'


def retain_freed_memory() -> bool:
  """Switches glibc malloc to keep freed memory in the process, and CPU dispatch to synchronous.

  Returns whether it applied (`reason()` says why not). Call it first thing
  in a process, before JAX creates its backend: threads that allocated
  before the call keep their own arenas, and the dispatch mode is read when
  the CPU client is created. Does nothing (and returns False) when
  VIT_JAX_RETAIN_HOST_MEMORY is 0/false/no, the C library is not glibc, or
  the process will use an accelerator (`accelerator_in_use`): the settings
  were measured to help the CPU backend only.
  """
  global _retaining, _reason
  if os.environ.get(ENV, '1').strip().lower() in ('0', 'false', 'no'):
    _reason = f'off: {ENV}={os.environ[ENV]}'
    return False
  if not is_glibc():
    _reason = 'off: the C library is not glibc'
    return False
  accelerator = accelerator_in_use()
  if accelerator:
    _reason = f'off: {accelerator} (the settings help the CPU backend only; JAX_PLATFORMS=cpu for a CPU run)'
    return False
  mallopt = ctypes.CDLL(None).mallopt  # The process's own C library.
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # The trim threshold is a size_t inside glibc: -1 becomes the largest size, i.e. never trim.
  settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
  _retaining = all(mallopt(parameter, value) == 1 for parameter, value in settings)
  _reason = 'on: freed host memory is kept for reuse' if _retaining else 'off: mallopt refused a setting'
  if _retaining:
    import jax  # Here, not at the top: callers import this module before anything else.
    jax.config.update('jax_cpu_enable_async_dispatch', False)
  return _retaining
