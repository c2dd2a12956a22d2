"""`vit-jax memory --config FILE [--devices N] [--config.KEY=VALUE ...]`: per-device memory of a run.

Compiles the train step of the config from shapes alone (nothing is
allocated) and prints parameter, optimizer-state and activation bytes per
device (vit_jax.training.memory). `--devices N` simulates N CPU devices, so
that a 64-device FSDP layout can be read on a laptop.

What the figures are, which the command prints under them: parameter,
optimizer-state and EMA bytes are the shards of the train state, exact on
every platform (the shardings are the same). Activations are the plan of the
compiler for the devices the step was compiled for: on CPU, and with
`--devices`, XLA:CPU's plan of the CPU program. That is not a
GPU/TPU figure: XLA:GPU and XLA:TPU fuse, schedule and rematerialise
differently. For those, run the command on the GPU/TPU machine itself (or
`vit-jax selfcheck` there for the peak memory a run reaches).
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
  compiler = f'XLA:{mesh.devices.flat[0].platform.upper()}'
  print(what_the_figures_are(compiler, mesh.size, simulated=devices is not None))
  if flags.FLAGS.json:
    print(json.dumps({'variant': config.model.variant, 'batch_size': config.batch_size,
                      'devices': mesh.size, 'data': mesh.shape['data'], 'fsdp': mesh.shape['fsdp'],
                      'activations_planned_by': compiler, **values}))


def what_the_figures_are(compiler: str, num_devices: int, simulated: bool) -> str:
  """The lines under the report: which figures hold on any platform, and whose plan the activations are."""
  where = f'{num_devices} simulated CPU devices' if simulated else f'these {num_devices} device(s)'
  lines = ['params, optimizer (and ema): exact on any platform (the shards of the train state).',
           f'activations: {compiler}\'s plan for {where}.']
  if compiler == 'XLA:CPU':
    lines[-1] = (f'activations: {compiler}\'s plan of the step compiled for {where} (CPU-only code '
                 'included); not a figure for a GPU or TPU, whose compilers plan their own: run vit-jax '
                 'memory (or vit-jax selfcheck, for the peak a run reaches) on the GPU/TPU machine.')
  return '\n'.join(lines)
