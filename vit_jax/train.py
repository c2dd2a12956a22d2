"""Train state, train and eval steps, and the loop: `train_and_evaluate(config, workdir)`."""

import functools
import json
import logging
import math
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vit_jax import checkpoint, input_pipeline, metrics as metrics_lib, optim, sharding
from vit_jax.errors import UsageError
from vit_jax.models import model_from_config


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


class DivergenceError(RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


def create_train_state(rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation,
                       image_size: int) -> TrainState:
  """A fresh train state. Pure: meant for `jax.eval_shape` and `jax.jit(out_shardings=...)`."""
  params = model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32))['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy against (optionally smoothed) labels.

  `labels` are integer classes (batch,) or soft targets (batch, classes), as
  mixup/CutMix batches carry.
  """
  num_classes = logits.shape[-1]
  targets = labels if labels.ndim == logits.ndim else jax.nn.one_hot(labels, num_classes)
  targets = optax.smooth_labels(targets, smoothing) if smoothing else targets
  return optax.softmax_cross_entropy(logits, targets)


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               model: nn.Module, tx: optax.GradientTransformation,
               schedule: optax.Schedule, label_smoothing: float) -> tuple[TrainState, dict]:
  """One optimizer step on a global batch. Returns the new state and scalar metrics."""
  rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    logits, _ = model.apply({'params': params}, batch['image'], train=True, rngs={'dropout': rng})
    return cross_entropy(logits, batch['label'], label_smoothing).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, {'train/loss': loss, 'train/grad_norm': optax.tree.norm(grads),
                     'train/lr': schedule(state.step)}


def eval_step(params: Any, batch: dict[str, jax.Array], *, model: nn.Module) -> dict[str, jax.Array]:
  """Sums over the real (mask = 1) examples of a padded eval batch."""
  logits, _ = model.apply({'params': params}, batch['image'], train=False)
  mask = batch['mask']
  correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
  return {'correct': (correct * mask).sum(),
          'loss': (cross_entropy(logits, batch['label']) * mask).sum(),
          'count': mask.sum()}


def evaluate(eval_fn, params, config, split, batch_sharding) -> dict[str, float]:
  """Accuracy and loss over every example of the eval split, exactly once."""
  totals = None
  for local in input_pipeline.eval_iterator(config, split, jax.process_index(), jax.process_count()):
    sums = eval_fn(params, sharding.global_batch(local, batch_sharding))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'eval/accuracy': float(totals['correct']) / count, 'eval/loss': float(totals['loss']) / count,
          'eval/num_examples': count}


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True) + '\n')


def _check_config(config: ml_collections.ConfigDict) -> None:
  for key in ('total_steps', 'batch_size', 'eval_batch_size', 'log_every_steps',
              'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
    if config[key] < 1:
      raise UsageError(f'config.{key}={config[key]} must be a positive integer.')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) in `workdir` until `config.total_steps`; returns the final metrics."""
  _check_config(config)
  model = model_from_config(config)
  mesh = sharding.make_mesh(config)
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh, 'config.eval_batch_size')
  is_main = jax.process_index() == 0

  # Data first: a missing dataset fails before anything is compiled.
  train_split = input_pipeline.open_split(config.dataset, config.dataset.train_split)
  eval_split = input_pipeline.open_split(config.dataset, config.dataset.eval_split)

  os.makedirs(workdir, exist_ok=True)
  tx = optim.create_optimizer(config)
  schedule = optim.create_schedule(config)
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))

  # Shapes first, then shardings, then the state is born already placed.
  init_fn = functools.partial(create_train_state, model=model, tx=tx, image_size=config.input.image_size)
  abstract_state = jax.eval_shape(init_fn, init_rng)
  replicated = sharding.replicated(mesh)
  state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
  batch_sharding = sharding.batch_sharding(mesh)

  manager = checkpoint.create_manager(workdir, config.keep_checkpoints)
  abstract_placed = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, state_sharding)
  state = checkpoint.restore_latest(manager, abstract_placed)
  if state is None:
    state = jax.jit(init_fn, out_shardings=state_sharding)(init_rng)
    # Fine-tuning hook: pretrained params from config.init.path (no-op when '').
    state = checkpoint.init_from_pretrained(state, config)
    logging.info('Initialised a new train state.')
  else:
    print(f'Resuming from the checkpoint at step {int(state.step)} in {workdir}.', flush=True)
  start_step = int(state.step)
  if is_main:
    _write_config(config, workdir)
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))
  if is_main:
    print(f'Model {config.model.variant}: {num_params:,} parameters; {len(train_split):,} training '
          f'and {len(eval_split):,} eval examples; {jax.device_count()} devices, '
          f'{jax.process_count()} processes.', flush=True)

  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                        label_smoothing=config.optimizer.label_smoothing),
      in_shardings=(state_sharding, batch_sharding, replicated),
      out_shardings=(state_sharding, replicated), donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, model=model),
                    in_shardings=(state_sharding.params, batch_sharding), out_shardings=replicated)

  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  progress = metrics_lib.Progress(config.total_steps, start_step)
  train_iter = input_pipeline.train_iterator(config, train_split, start_step,
                                             jax.process_index(), jax.process_count())
  final: dict[str, float] = {}
  interval_sums, interval_steps = None, 0
  try:
    for step in range(start_step + 1, config.total_steps + 1):
      batch = sharding.global_batch(next(train_iter), batch_sharding)
      state, step_metrics = step_fn(state, batch, dropout_rng)
      # Summing on device keeps the loop free of host synchronisation between logs.
      interval_sums = step_metrics if interval_sums is None else jax.tree.map(
          jnp.add, interval_sums, step_metrics)
      interval_steps += 1

      is_last = step == config.total_steps
      if step % config.log_every_steps == 0 or step % config.checkpoint_every_steps == 0 or is_last:
        means = {k: float(v) / interval_steps for k, v in jax.device_get(interval_sums).items()}
        if not all(math.isfinite(v) for v in means.values()):
          raise DivergenceError(
              f'Training diverged: non-finite loss or gradient norm at step {step} ({means}). '
              'The last good checkpoint is kept; lower config.optimizer.learning_rate or '
              'raise config.optimizer.warmup_steps.')
        means['train/lr'] = float(schedule(step - 1))
        means['train/images_per_sec'] = progress.rate(step) * config.batch_size
        interval_sums, interval_steps = None, 0
        writer.write(step, means)
        final.update(means)
        if is_main:
          print(progress.line(step, means['train/images_per_sec'] / config.batch_size, means), flush=True)

      if step % config.eval_every_steps == 0 or is_last:
        eval_metrics = evaluate(eval_fn, state.params, config, eval_split, batch_sharding)
        writer.write(step, eval_metrics)
        final.update(eval_metrics)
        if is_main:
          print(f'eval at step {step}: accuracy {eval_metrics["eval/accuracy"]:.4f} | '
                f'loss {eval_metrics["eval/loss"]:.4f} | {int(eval_metrics["eval/num_examples"])} examples',
                flush=True)
        progress.rate(step)  # Exclude eval time from the next throughput figure.

      if step % config.checkpoint_every_steps == 0 or is_last:
        checkpoint.save(manager, step, state)
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
  return final
