"""vit_jax.cpu.hostmem: freed host memory stays in the process, so repeated large allocations stop faulting."""

import os
import subprocess
import sys

import pytest

from vit_jax.cpu import hostmem

# Allocates and frees a 64 MiB buffer (a train step's temporaries in miniature)
# ten times after one warm-up, from a worker thread as XLA's executor does,
# and prints the minor page faults of the ten.
PROBE = r'''
import ctypes, resource, sys, threading
from vit_jax.cpu import hostmem
import jax
print(hostmem.retain_freed_memory(), hostmem.retaining(), jax.config.read('jax_cpu_enable_async_dispatch'))
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 64 << 20
def step():
  buffer = libc.malloc(size)
  ctypes.memset(buffer, 1, size)  # Touch every page, as a computation writing its temporaries.
  libc.free(buffer)
def run(steps):
  thread = threading.Thread(target=lambda: [step() for _ in range(steps)])
  thread.start(); thread.join()
run(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
run(10)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''

# The switch is glibc's mallopt; CI and the project's machines run Linux with
# glibc, so there these tests run. Elsewhere (macOS, musl) it is a no-op.
glibc = pytest.mark.skipif(not hostmem.is_glibc(), reason='the allocator switch applies to glibc only')


def probe(retain: str) -> tuple[str, int]:
  # JAX_PLATFORMS=cpu: the settings apply to CPU runs only, also on a host with a GPU plugin.
  env = {**os.environ, 'VIT_JAX_RETAIN_HOST_MEMORY': retain, 'JAX_PLATFORMS': 'cpu'}
  lines = subprocess.run([sys.executable, '-c', PROBE], env=env, capture_output=True, text=True,
                         check=True).stdout.split('\n')
  return lines[0], int(lines[1])


@glibc
def test_retained_memory_is_reused_without_page_faults():
  applied, faults = probe('1')
  assert applied == 'True True False'  # Applied, and CPU dispatch made synchronous.
  pages = 10 * (64 << 20) // 4096
  assert faults < pages // 100, f'{faults} page faults for 10 reuses of 64 MiB'


@glibc
def test_opt_out_keeps_glibc_defaults_which_fault_every_time():
  applied, faults = probe('0')
  assert applied == 'False False True'
  # glibc maps a 64 MiB block fresh for each malloc and unmaps it on free: each
  # reuse faults its pages again (2 MiB pages where transparent huge pages apply).
  assert faults >= 10 * (64 << 20) // (2 << 20)


def test_devices_and_the_host_memory_settings_know_the_same_accelerator_plugins(monkeypatch, tmp_path):
  """One list: every plugin that turns the host-memory settings off is one `vit-jax devices` reports."""
  from vit_jax.tools import devices
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  monkeypatch.syspath_prepend(str(tmp_path))
  for module in hostmem.ACCELERATOR_MODULES:
    (tmp_path / module).mkdir()
    (tmp_path / module / '__init__.py').write_text('')  # What `pip install jax[cuda12]` (or rocm, tpu) installs.
    monkeypatch.syspath_prepend(str(tmp_path))  # Python's path finders forget what they did not find.
    _, lines = devices.report()
    assert f'accelerator plugins installed: {module}' in lines[0], (module, lines[0])
    assert lines[-1].endswith(f'left alone, the JAX accelerator plugin {module} is installed'), (module, lines[-1])
    (tmp_path / module / '__init__.py').unlink()
    (tmp_path / module).rmdir()
