"""The training loop: `train_and_evaluate(config, workdir)`, with evaluation and checkpoints."""

import functools
import math
import os
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jax.experimental import multihost_utils
from jax.sharding import Mesh

from vit_jax import checkpoint
from vit_jax.data import pipeline
from vit_jax.training import memory
from vit_jax.training import metrics as metrics_lib
from vit_jax.training import optim
from vit_jax.training import preemption
from vit_jax.training.steps import TrainState, create_train_state, train_step, eval_step, DivergenceError
from vit_jax.training import sharding
from vit_jax.errors import UsageError
from vit_jax.models import model_from_config


def evaluate(eval_fn, params, config, split, batch_sharding) -> dict[str, float]:
  """Accuracy and loss over every example of the eval split, exactly once."""
  totals = None
  for local in pipeline.eval_iterator(config, split, jax.process_index(), jax.process_count()):
    sums = eval_fn(params, sharding.global_batch(local, batch_sharding))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'eval/accuracy': float(totals['correct']) / count, 'eval/loss': float(totals['loss']) / count,
          'eval/num_examples': count}


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes workdir/config.json aside and renames it: a failed write keeps the previous one."""
  path = os.path.join(workdir, 'config.json')
  with open(path + '.tmp', 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True) + '\n')
  os.replace(path + '.tmp', path)


def _check_config(config: ml_collections.ConfigDict) -> None:
  for key in ('total_steps', 'batch_size', 'eval_batch_size', 'log_every_steps', 'eval_every_steps',
              'checkpoint_every_steps', 'keep_checkpoints', 'accumulation_steps'):
    if config[key] < 1:
      raise UsageError(f'config.{key}={config[key]} must be a positive integer.')
  if config.best_mode not in ('max', 'min'):
    raise UsageError(f"config.best_mode={config.best_mode!r}; use 'max' or 'min'.")


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


def setup(config: ml_collections.ConfigDict, mesh: Mesh) -> Setup:
  """Model, optimizer, state shapes and shardings, and the jitted steps for `mesh`.

  Checks the config against the mesh first, so that bad input fails before
  anything is compiled or written.
  """
  _check_config(config)
  model = model_from_config(config)
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh, 'config.eval_batch_size')
  if config.batch_size % (config.accumulation_steps * mesh.size):
    raise UsageError(f'config.batch_size={config.batch_size} must split into '
                     f'accumulation_steps={config.accumulation_steps} micro-batches of a multiple of '
                     f'the {mesh.size} devices; use a multiple of {config.accumulation_steps * mesh.size}.')
  tx = optim.create_optimizer(config)
  schedule = optim.create_schedule(config)

  # Shapes first, then shardings; the state is later born already placed.
  init_fn = functools.partial(create_train_state, model=model, tx=tx, image_size=config.input.image_size)
  abstract_state = jax.eval_shape(init_fn, jax.random.key(0))
  state_sharding = sharding.state_shardings(abstract_state, mesh, config)
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                        label_smoothing=config.optimizer.label_smoothing,
                        accumulation_steps=config.accumulation_steps),
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


def _fetch_checked(step: int, step_metrics: dict) -> dict[str, float]:
  """Host copy of the step's metrics; raises DivergenceError if any is not finite."""
  values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
  if not all(math.isfinite(v) for v in values.values()):
    raise DivergenceError(
        f'Training diverged at step {step}: non-finite loss or gradient norm ({values}). Nothing '
        'from this step was saved; the last good checkpoint is kept. Lower '
        'config.optimizer.learning_rate or raise config.optimizer.warmup_steps.')
  return values


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) in `workdir` until `config.total_steps`; returns the final metrics."""
  mesh = sharding.make_mesh(config)
  run = setup(config, mesh)
  checkpoint.check_workdir(workdir, config, run.abstract_state)
  is_main = jax.process_index() == 0

  # Data next: a missing dataset fails before anything is compiled or written.
  # Process 0 prepares a shipped dataset first so that processes never race on it.
  if is_main:
    pipeline.get_builder(config.dataset)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('dataset_prepared')
  train_split = pipeline.open_split(config.dataset, config.dataset.train_split)
  eval_split = pipeline.open_split(config.dataset, config.dataset.eval_split)

  init_rng, dropout_rng = seed_rngs(config)

  def fresh_state() -> TrainState:
    state = jax.jit(run.init_fn, out_shardings=run.state_sharding)(init_rng)
    # Fine-tuning hook: pretrained params from config.init.path (no-op when '').
    return checkpoint.init_from_pretrained(state, config)

  # A new run builds its state (and reads any pretrained file) before it
  # writes anything, so a bad config.init.path leaves no trace.
  state = None if checkpoint.has_checkpoints(workdir) else fresh_state()
  os.makedirs(workdir, exist_ok=True)
  manager = checkpoint.create_manager(workdir, config)
  if state is None:
    state = checkpoint.restore_latest(manager, sharding.placed(run.abstract_state, run.state_sharding))
    if state is None:  # Every checkpoint was damaged and set aside.
      state = fresh_state()
    elif is_main:
      print(f'Resuming from the checkpoint at step {int(state.step)} in {workdir}.', flush=True)
  start_step = int(state.step)
  if is_main:
    _write_config(config, workdir)

  train_iter = pipeline.train_iterator(config, train_split, start_step,
                                             jax.process_index(), jax.process_count())
  first_batch = sharding.global_batch(next(train_iter), run.batch_sharding)
  # Compiled once, ahead of time: every step reuses this executable.
  compiled_step = run.step_fn.lower(state, first_batch, dropout_rng).compile()
  if is_main:
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(run.abstract_state.params))
    print(f'Model {config.model.variant}: {num_params:,} parameters; {len(train_split):,} training '
          f'and {len(eval_split):,} eval examples; {jax.device_count()} devices '
          f'(mesh data={mesh.shape["data"]}, fsdp={mesh.shape["fsdp"]}), {jax.process_count()} processes.',
          flush=True)
    print(memory.format_report(memory.report(run.abstract_state, run.state_sharding, compiled_step)),
          flush=True)

  writer = metrics_lib.MetricWriter(workdir, enabled=is_main, resume_step=start_step)
  progress = metrics_lib.Progress(config.total_steps, start_step)
  final: dict[str, float] = {}
  batch = first_batch
  try:
    with preemption.StopRequest() as stop:
      for step in range(start_step + 1, config.total_steps + 1):
        if batch is None:
          batch = sharding.global_batch(next(train_iter), run.batch_sharding)
        state, step_metrics = compiled_step(state, batch, dropout_rng)
        batch = None

        is_last = step == config.total_steps
        stopping = stop.should_stop(step, every=config.log_every_steps)
        is_checkpoint = step % config.checkpoint_every_steps == 0 or is_last or stopping
        if step % config.log_every_steps == 0 or is_checkpoint:
          # Only now does the host wait for the device.
          values = _fetch_checked(step, step_metrics)
          values['train/images_per_sec'] = progress.rate(step) * config.batch_size
          writer.write(step, values)
          final.update(values)
          if is_main:
            print(progress.line(step, values['train/images_per_sec'] / config.batch_size, values),
                  flush=True)

        eval_metrics = None
        if step % config.eval_every_steps == 0 or is_last:
          eval_metrics = evaluate(run.eval_fn, state.params, config, eval_split, run.batch_sharding)
          writer.write(step, eval_metrics)
          final.update(eval_metrics)
          if is_main:
            print(f'eval at step {step}: accuracy {eval_metrics["eval/accuracy"]:.4f} | loss '
                  f'{eval_metrics["eval/loss"]:.4f} | {int(eval_metrics["eval/num_examples"])} examples',
                  flush=True)
          progress.rate(step)  # Exclude eval time from the next throughput figure.

        if is_checkpoint:
          checkpoint.save(manager, step, state, eval_metrics)
        if stopping and not is_last:
          if is_main:
            print(f'Received {stop.signal_name or "a stop request"}: saved the checkpoint of step '
                  f'{step} in {workdir}; run the same command to resume.', flush=True)
          break
  finally:
    writer.close()
    checkpoint.finish(manager)
  return final
