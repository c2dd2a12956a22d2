"""`vit-jax devices`: the devices this install of JAX sees, and what the model runs on them.

Prints the JAX version, the backend JAX will use and its devices, the
accelerator plugins installed, which attention a bfloat16 and a float32 B/16
would run there, and the host-memory setting. With `--expect gpu` (or tpu,
cpu) it ends with `error: ...` and exit code 2 unless that is the backend:
the one-line check that an install sees its accelerators (docs/install.md).
"""

import sys
from typing import Optional

from vit_jax.errors import ArgumentParser


def report() -> tuple[str, list[str]]:
  """(JAX's default backend, the lines describing it)."""
  import jax

  from vit_jax.config import defaults
  from vit_jax.cpu import hostmem
  from vit_jax.models.variants import attention_implementation

  backend = jax.default_backend()
  devices = jax.devices()
  installed = hostmem.installed_accelerator_plugins()
  lines = [f'jax {jax.__version__}; accelerator plugins installed: {", ".join(installed) or "none"}',
           f'backend: {backend}, {len(devices)} device(s) of {jax.process_count()} process(es): '
           f'{devices[0].device_kind}']
  lines += [f'  {d}' for d in devices[:8]] + ([f'  ... and {len(devices) - 8} more'] if len(devices) > 8 else [])
  config = defaults.get_config()
  config.model.variant, config.input.image_size = 'B/16', 224
  for dtype in ('bfloat16', 'float32') if backend == 'gpu' else ('float32',):
    config.model.dtype = dtype
    lines.append(f'B/16 {dtype}: {attention_implementation(config, backend)}')
  accelerator = hostmem.accelerator_in_use()
  lines.append('host memory settings (vit_jax/cpu/hostmem.py): ' + (
      f'left alone, {accelerator}' if accelerator else
      'applied by the commands that run the model: train, predict, evaluate, the benchmarks, selfcheck, ... '
      '(CPU backend)'))
  return backend, lines


def main(argv: Optional[list[str]] = None) -> int:
  parser = ArgumentParser(prog='vit-jax devices', description=__doc__.split('\n\n')[0])
  parser.add_argument('--expect', choices=('cpu', 'gpu', 'tpu'),
                      help='fail (exit 2) unless JAX runs on this backend')
  args = parser.parse_args(argv)
  backend, lines = report()
  print('\n'.join(lines), flush=True)
  if args.expect and backend != args.expect:
    hint = {'gpu': 'pip install -e .[cuda12] on a host with an NVIDIA driver',
            'tpu': 'pip install -e .[tpu] on a TPU VM', 'cpu': 'JAX_PLATFORMS=cpu'}[args.expect]
    print(f'error: expected the {args.expect} backend, but JAX runs on {backend}; {hint} '
          '(docs/install.md).', file=sys.stderr)
    return 2
  return 0
