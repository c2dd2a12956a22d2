"""Per-device memory of a training run: parameters, optimizer state, activations.

Parameter and optimizer bytes come from the abstract train state and its
shardings (the size of each array's shard on one device). Activation and
scratch bytes come from XLA's memory analysis of the compiled train step, the
figure the compiler plans for one device.

  python -m vit_jax.memory --config configs/vit_b16.py --devices 64 [--config.mesh.fsdp=-1]

prints the report for a virtual set of CPU devices without running a step (on
CPU the activation figure is the CPU compiler's plan; GPU/TPU plans differ).
"""

import json
import math
from typing import Any

import jax
import jax.numpy as jnp


def shard_bytes(abstract: Any, shardings: Any) -> int:
  """Bytes one device holds of the arrays in `abstract` laid out by `shardings` (the maximum over devices)."""
  total = 0
  for x, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    shard = sharding.shard_shape(x.shape)
    total += math.prod(shard) * x.dtype.itemsize
  return total


def report(abstract_state: Any, state_shardings: Any, compiled: Any = None) -> dict[str, float]:
  """GiB per device: params, optimizer state, and (given the compiled step) activations/scratch."""
  gib = 2.0**30
  out = {'params_gib': shard_bytes(abstract_state.params, state_shardings.params) / gib,
         'optimizer_gib': shard_bytes(abstract_state.opt_state, state_shardings.opt_state) / gib}
  if compiled is not None:
    analysis = compiled.memory_analysis()
    if analysis is not None:
      out['activations_gib'] = analysis.temp_size_in_bytes / gib
  return out


def format_report(values: dict[str, float]) -> str:
  """One line, e.g. 'Memory per device: params 0.322 GiB, optimizer 0.645 GiB, activations 21.3 GiB.'"""
  def size(gib: float) -> str:
    return f'{gib:.3f} GiB' if gib >= 0.1 else f'{gib * 1024:.3f} MiB'
  parts = [f'{name.removesuffix("_gib")} {size(value)}' for name, value in values.items()]
  return 'Memory per device: ' + ', '.join(parts) + '.'


def compile_step(config, mesh) -> tuple[Any, Any]:
  """(setup, compiled train step) for `config` on `mesh`, from shapes only: nothing is allocated."""
  from vit_jax import sharding, train  # train imports this module.
  run = train.setup(config, mesh)
  placed = sharding.placed(run.abstract_state, run.state_sharding)
  size = config.input.image_size
  soft = config.input.mixup_alpha > 0 or config.input.cutmix_alpha > 0
  label_shape = (config.batch_size, config.dataset.num_classes) if soft else (config.batch_size,)
  batch = {'image': jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.float32,
                                         sharding=run.batch_sharding),
           'label': jax.ShapeDtypeStruct(label_shape, jnp.float32 if soft else jnp.int32,
                                         sharding=run.batch_sharding)}
  rng = jax.eval_shape(lambda: jax.random.key(0))
  return run, run.step_fn.lower(placed, batch, rng).compile()


def main(argv: list[str]) -> None:
  del argv
  from absl import flags, logging
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # As the launcher: no INFO lines from JAX and TF.
  from vit_jax import sharding
  from vit_jax.errors import UsageError
  config = _CONFIG.value
  try:
    mesh = sharding.make_mesh(config)
    run, compiled = compile_step(config, mesh)
  except UsageError as e:
    raise SystemExit(f'error: {e}') from None
  values = report(run.abstract_state, run.state_sharding, compiled)
  print(f'{config.model.variant}, batch {config.batch_size} on {mesh.size} devices '
        f'(data={mesh.shape["data"]}, fsdp={mesh.shape["fsdp"]}, '
        f'accumulation_steps={config.accumulation_steps}, remat={config.model.remat}):')
  print(format_report(values))
  if _JSON.value:
    print(json.dumps({'variant': config.model.variant, 'batch_size': config.batch_size,
                      'devices': mesh.size, 'data': mesh.shape['data'], 'fsdp': mesh.shape['fsdp'],
                      **values}))


if __name__ == '__main__':
  import os
  import sys

  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file under configs/.',
                                            lock_config=True)
  _DEVICES = flags.DEFINE_integer('devices', None, 'Simulate this many CPU devices (default: the real ones).')
  _JSON = flags.DEFINE_bool('json', False, 'Also print the figures as one JSON line.')
  flags.mark_flags_as_required(['config'])
  # The device count must be set before JAX starts its backends, i.e. before flags are parsed.
  for i, arg in enumerate(sys.argv):
    count = arg.split('=', 1)[1] if arg.startswith('--devices=') else (
        sys.argv[i + 1] if arg == '--devices' and i + 1 < len(sys.argv) else None)
    if count:
      os.environ['JAX_PLATFORMS'] = 'cpu'
      os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                                 f' --xla_force_host_platform_device_count={count}').strip()
  app.run(main)
