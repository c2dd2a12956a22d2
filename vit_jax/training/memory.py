"""Per-device memory of a training run: parameters, optimizer state, activations.

Parameter and optimizer bytes come from the abstract train state and its
shardings (the size of each array's shard on one device). Activation and
scratch bytes come from XLA's memory analysis of the compiled train step, the
figure the compiler plans for one device.
The command `vit-jax memory` (vit_jax/tools/memory.py) prints this report
for any config without running a step.
"""

import math
from typing import Any

import jax


def shard_bytes(abstract: Any, shardings: Any) -> int:
  """Bytes one device holds of the arrays in `abstract` laid out by `shardings` (the maximum over devices)."""
  total = 0
  for x, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    shard = sharding.shard_shape(x.shape)
    total += math.prod(shard) * x.dtype.itemsize
  return total


def report(abstract_state: Any, state_shardings: Any, compiled: Any = None) -> dict[str, float]:
  """GiB per device: params, optimizer state, EMA params (if kept) and (given the compiled step) activations."""
  gib = 2.0**30
  out = {'params_gib': shard_bytes(abstract_state.params, state_shardings.params) / gib,
         'optimizer_gib': shard_bytes(abstract_state.opt_state, state_shardings.opt_state) / gib}
  if abstract_state.ema_params is not None:  # config.ema: one more parameter-sized copy.
    out['ema_gib'] = shard_bytes(abstract_state.ema_params, state_shardings.ema_params) / gib
  if compiled is not None:
    analysis = compiled.memory_analysis()
    if analysis is not None:
      out['activations_gib'] = analysis.temp_size_in_bytes / gib
  return out


def format_report(values: dict[str, float]) -> str:
  """One line, e.g. 'Memory per device: params 0.322 GiB, optimizer 0.645 GiB, activations 21.3 GiB.'"""
  def size(gib: float) -> str:
    return f'{gib:.3f} GiB' if gib >= 0.1 else f'{gib * 1024:.3f} MiB'
  names = {'activations_memory_optimized_gib': "activations with config.cpu_scheduler='memory'"}
  parts = [f'{names.get(name, name.removesuffix("_gib"))} {size(value)}' for name, value in values.items()]
  return 'Memory per device: ' + ', '.join(parts) + '.'
