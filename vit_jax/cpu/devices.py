"""CPU devices: run a data-parallel step as several concurrent programs on one CPU.

JAX's CPU backend is one device by default, and each operation of a train
step is spread over all cores. For small models the operations are too small
to keep two cores busy through the whole step (ViT-Ti/16's matrices are 192
wide). `split_cpu(n)` makes the backend `n` devices instead
(XLA's `--xla_force_host_platform_device_count`); the train step is then
data parallel over them like over any mesh (`config.mesh`), so each device
runs the step on `batch / n` images and the programs fill each other's idle
cores. Results equal the one-device results up to float rounding (the
gradient mean is summed in a different order).

Measured on 2 cores (docs/performance.md): 2 devices train ViT-Ti/16 faster
than one (against timm at batch 8: 0.95-0.98x on one device, 1.03-1.16x on
two); B/16, whose products already fill both cores, gains nothing, and 4
devices are slower.
The batch (and the eval batch) must divide by `n`.
"""

import os
import re
from typing import Optional

from vit_jax.errors import UsageError

ENV = 'VIT_JAX_CPU_DEVICES'
XLA_FLAG = '--xla_force_host_platform_device_count'


def requested(num_devices: Optional[int] = None) -> int:
  """The CPU device count asked for: `num_devices`, else $VIT_JAX_CPU_DEVICES, else 1."""
  if num_devices is None:
    value = os.environ.get(ENV, '1')
    try:
      num_devices = int(value)
    except ValueError:
      raise UsageError(f'{ENV}={value!r} is not an integer; set it to the number of CPU devices, '
                       'e.g. 2.') from None
  if num_devices < 1:
    raise UsageError(f'cpu_devices={num_devices} must be at least 1 (1 = JAX\'s default, one CPU device).')
  return num_devices


def split_cpu(num_devices: Optional[int] = None) -> int:
  """Makes JAX's CPU backend `num_devices` devices (default: $VIT_JAX_CPU_DEVICES, else 1). Returns the count.

  Call it before JAX creates its CPU backend (before the first computation),
  as the launcher and the benchmark do: it works through XLA_FLAGS, which XLA
  reads then. 1 changes nothing. If XLA_FLAGS already sets the device count
  (the test suite sets 8), that setting stands and a different request is an
  error rather than silently ignored.
  """
  num_devices = requested(num_devices)
  flags = os.environ.get('XLA_FLAGS', '')
  match = re.search(rf'{XLA_FLAG}=(\d+)', flags)
  if match:
    if num_devices not in (1, int(match.group(1))):
      raise UsageError(f'cpu_devices={num_devices} conflicts with XLA_FLAGS, which already has '
                       f'{match.group(0)}; drop one of the two.')
    return int(match.group(1))
  if num_devices > 1:
    os.environ['XLA_FLAGS'] = f'{flags} {XLA_FLAG}={num_devices}'.strip()
  return num_devices
