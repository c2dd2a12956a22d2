"""`vit-jax memory --config FILE [--devices N] [--config.KEY=VALUE ...]`: per-device memory of a run.

Compiles the train step of the config from shapes alone (nothing is
allocated) and prints parameter, optimizer-state and activation bytes per
device (vit_jax.training.memory). `--devices N` simulates N CPU devices, so
the plan of a 64-device FSDP run can be read on a laptop (on CPU the
activation figure is the CPU compiler's plan; GPU/TPU plans differ).
"""

import json
import os
from typing import Any

from absl import flags

from vit_jax.config import files
from vit_jax.cpu import scheduler
from vit_jax.errors import UsageError


def define_flags() -> None:
  """The command's flags; defined when the command runs, so importing this module adds none."""
  files.define_config_flag('Config: a configs/*.py file (e.g. configs/vit_b16.py) or a workdir config.json.')
  flags.DEFINE_integer('devices', None, 'Simulate this many CPU devices (default: the real ones).')
  flags.DEFINE_bool('json', False, 'Also print the figures as one JSON line.')
  flags.mark_flags_as_required(['config'])


def simulate_devices(argv: list[str]) -> None:
  """Reads `--devices N` from the raw arguments: it must reach XLA before JAX starts its backends."""
  for i, arg in enumerate(argv):
    count = arg.split('=', 1)[1] if arg.startswith('--devices=') else (
        argv[i + 1] if arg == '--devices' and i + 1 < len(argv) else None)
    if count and count.isdigit() and int(count) > 0:  # Else the flag's parser reports it.
      os.environ['JAX_PLATFORMS'] = 'cpu'
      os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                                 f' --xla_force_host_platform_device_count={count}').strip()


def lower_step(config, mesh) -> tuple[Any, Any]:
  """(setup, lowered train step) for `config` on `mesh`, from shapes only: nothing is allocated."""
  import jax
  import jax.numpy as jnp

  from vit_jax.training import setup as setup_lib, sharding

  run = setup_lib.setup(config, mesh)
  placed = sharding.placed(run.abstract_state, run.state_sharding)
  size = config.input.image_size
  soft = config.input.mixup_alpha > 0 or config.input.cutmix_alpha > 0
  label_shape = (config.batch_size, config.dataset.num_classes) if soft else (config.batch_size,)
  from vit_jax.config.sizes import image_hw
  batch = {'image': jax.ShapeDtypeStruct((config.batch_size, *image_hw(size), 3), jnp.float32,
                                         sharding=run.batch_sharding),
           'label': jax.ShapeDtypeStruct(label_shape, jnp.float32 if soft else jnp.int32,
                                         sharding=run.batch_sharding)}
  rng = jax.eval_shape(lambda: jax.random.key(0))
  return run, run.step_fn.lower(placed, batch, rng)


def main(argv: list[str]) -> None:
  from vit_jax.training import memory, sharding

  if len(argv) > 1:
    raise UsageError(f'unexpected arguments: {" ".join(argv[1:])}; every option is a --flag.')

  config = flags.FLAGS.config
  devices = flags.FLAGS.devices
  if devices is not None and devices < 1:
    raise UsageError(f'--devices={devices}: give the number of CPU devices to simulate (1 or more).')
  mesh = sharding.make_mesh(config)
  # On CPU, the plan of each XLA:CPU scheduler the launcher may choose (vit_jax/cpu/scheduler.py):
  # 'auto' runs the default unless the host's free memory is short of it.
  on_cpu = mesh.devices.flat[0].platform == 'cpu'
  memory_only = on_cpu and config.cpu_scheduler == 'memory'
  run, lowered = lower_step(config, mesh)
  compiled = lowered.compile(scheduler.MEMORY_OPTIMIZED if memory_only else None)
  values = memory.report(run.abstract_state, run.state_sharding, compiled)
  if on_cpu and config.cpu_scheduler == 'auto' and 'activations_gib' in values:
    low = lowered.compile(scheduler.MEMORY_OPTIMIZED)
    values['activations_memory_optimized_gib'] = low.memory_analysis().temp_size_in_bytes / 2.0**30
  print(f'{config.model.variant}, batch {config.batch_size} on {mesh.size} devices '
        f'(data={mesh.shape["data"]}, fsdp={mesh.shape["fsdp"]}, '
        f'accumulation_steps={config.accumulation_steps}, remat={config.model.remat}):')
  print(memory.format_report(values))
  if flags.FLAGS.json:
    print(json.dumps({'variant': config.model.variant, 'batch_size': config.batch_size,
                      'devices': mesh.size, 'data': mesh.shape['data'], 'fsdp': mesh.shape['fsdp'],
                      **values}))
