"""What a run is before any data: model, optimizer, state shapes and shardings, jitted steps.

`setup(config, mesh)` is shared by the training loop, the memory report and
the benchmark; it imports no TensorFlow (no data pipeline), so the benchmark
runs on accelerator hosts without it.
"""

import functools
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import ml_collections
import optax
from jax.sharding import Mesh

from vit_jax.cpu import scheduler
from vit_jax.errors import UsageError
from vit_jax.models import model_from_config
from vit_jax.training import flexi, optim, platform as platform_lib, sharding
from vit_jax.training.steps import TrainState, create_train_state, eval_step, train_step


def checkpoint_metric_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The eval metrics saved with each checkpoint (`evaluate`'s, and the EMA's): what best_metric may name."""
  prefixes = ('eval', 'eval_ema') if config.ema.decay > 0 else ('eval',)
  return tuple(f'{prefix}/{name}' for prefix in prefixes for name in ('accuracy', 'loss'))


def _check_config(config: ml_collections.ConfigDict) -> None:
  for key in ('total_steps', 'batch_size', 'eval_batch_size', 'log_every_steps', 'eval_every_steps',
              'checkpoint_every_steps', 'keep_checkpoints', 'accumulation_steps'):
    if config[key] < 1:
      raise UsageError(f'config.{key}={config[key]} must be a positive integer.')
  if config.best_mode not in ('max', 'min'):
    raise UsageError(f"config.best_mode={config.best_mode!r}; use 'max' or 'min'.")
  if config.best_metric and config.best_metric not in checkpoint_metric_names(config):
    raise UsageError(f'config.best_metric={config.best_metric!r} is not an eval metric this run writes; '
                     f'use one of {", ".join(checkpoint_metric_names(config))}, or \'\' to keep no best '
                     'checkpoint.')
  if not 0.0 <= config.ema.decay < 1.0:
    raise UsageError(f'config.ema.decay={config.ema.decay} must be in [0, 1), e.g. 0.9999; 0 disables EMA.')
  scheduler.check_choice(config.cpu_scheduler)
  if config.model.dtype == 'float16':
    raise UsageError("config.model.dtype='float16' would train without loss scaling, which vit_jax does not "
                     "do (gradients underflow); use 'bfloat16' (float32's range, the same memory) or 'float32'.")
  if config.fewshot.every_steps < 0:
    raise UsageError(f'config.fewshot.every_steps={config.fewshot.every_steps} must be >= 0 (0 disables).')


class Setup(NamedTuple):
  """Everything about a run that follows from its config and mesh, before any data."""
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  init_fn: Callable[[jax.Array], TrainState]
  abstract_state: TrainState
  state_sharding: Any
  batch_sharding: Any
  step_fn: Callable  # jitted train_step(state, batch, rng) -> (state, metrics)
  eval_fn: Callable  # jitted eval_step(params, batch) -> sums


def setup(config: ml_collections.ConfigDict, mesh: Mesh, platform: Optional[str] = None) -> Setup:
  """Model, optimizer, state shapes and shardings, and the jitted steps for `mesh`.

  Checks the config against the mesh first, so that bad input fails before
  anything is compiled or written. The model computes what `platform` runs
  (`vit_jax.training.platform.platform_model`): by default the platform of
  the mesh's devices; name another ('cuda', 'tpu') to lower the steps for it
  from this host.
  """
  _check_config(config)
  platform = platform or platform_lib.mesh_platform(mesh)
  base_model = model_from_config(config)
  model, _ = platform_lib.platform_model(base_model, config, platform)
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh, 'config.eval_batch_size')
  if config.batch_size % (config.accumulation_steps * mesh.size):
    raise UsageError(f'config.batch_size={config.batch_size} must split into '
                     f'accumulation_steps={config.accumulation_steps} micro-batches of a multiple of '
                     f'the {mesh.size} devices; use a multiple of {config.accumulation_steps * mesh.size}.')
  tx = optim.create_optimizer(config)
  schedule = optim.create_schedule(config)

  # Shapes first, then shardings; the state is later born already placed.
  init_fn = functools.partial(create_train_state, model=model, tx=tx, image_size=config.input.image_size,
                              ema=config.ema.decay > 0)
  abstract_state = jax.eval_shape(init_fn, jax.random.key(0))
  # Python bools: the frozen parameters' backward pass is compiled away.
  frozen = optim.frozen_mask(abstract_state.params, config.optimizer.freeze) if config.optimizer.freeze else None
  state_sharding = sharding.state_shardings(abstract_state, mesh, config)
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                        label_smoothing=config.optimizer.label_smoothing,
                        accumulation_steps=config.accumulation_steps, frozen=frozen,
                        ema_decay=config.ema.decay, ema_warmup=config.ema.warmup,
                        patch_models=flexi.patch_models(base_model, config, platform)),
      in_shardings=(state_sharding, batch_sharding, replicated),
      out_shardings=(state_sharding, replicated), donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, model=model),
                    in_shardings=(state_sharding.params, batch_sharding), out_shardings=replicated)
  return Setup(model, tx, schedule, init_fn, abstract_state, state_sharding, batch_sharding,
               step_fn, eval_fn)


def seed_rngs(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """(init_rng, dropout_rng) of a run: functions of config.seed only, never of the layout."""
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  return init_rng, dropout_rng
