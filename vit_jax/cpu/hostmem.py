"""Host memory: keep what a step frees for the next step instead of returning it to the OS.

XLA:CPU allocates each execution's temporaries with malloc and frees them
when the execution ends: for a ViT train step that is one block of hundreds
of megabytes to gigabytes (2 GiB for ViT-Ti/16 at batch 32). glibc serves
blocks that large with mmap and gives them back with munmap (and XLA's
threads allocate from their own arenas, which do the same). So every
step faults all of its memory back in, one zeroed 4 KiB page at a time: on a
2-core CPU that was 566,000 page faults and about a second of kernel time per
ViT-Ti/16 step at batch 32, a fifth of its CPU time (README, Performance).

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
"""

import ctypes
import os
import platform

ENV = 'VIT_JAX_RETAIN_HOST_MEMORY'

# mallopt parameters of glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

_retaining = False


def is_glibc() -> bool:
  """Whether this process runs on Linux with glibc, the one allocator `retain_freed_memory` switches."""
  return platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc'


def retaining() -> bool:
  """Whether `retain_freed_memory` has switched this process's allocator."""
  return _retaining


def retain_freed_memory() -> bool:
  """Switches glibc malloc to keep freed memory in the process, and CPU dispatch to synchronous.

  Returns whether it applied. Call it first thing in a process, before JAX
  creates its backend: threads that allocated before the call keep their own
  arenas, and the dispatch mode is read when the CPU client is created. Does
  nothing (and returns False) when VIT_JAX_RETAIN_HOST_MEMORY is 0/false/no
  or the C library is not glibc.
  """
  if os.environ.get(ENV, '1').strip().lower() in ('0', 'false', 'no'):
    return False
  if not is_glibc():
    return False
  mallopt = ctypes.CDLL(None).mallopt  # The process's own C library.
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # The trim threshold is a size_t inside glibc: -1 becomes the largest size, i.e. never trim.
  settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
  global _retaining
  _retaining = all(mallopt(parameter, value) == 1 for parameter, value in settings)
  if _retaining:
    import jax  # Here, not at the top: callers import this module before anything else.
    jax.config.update('jax_cpu_enable_async_dispatch', False)
  return _retaining
