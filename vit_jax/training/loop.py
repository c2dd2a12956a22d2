"""The training loop: `train_and_evaluate(config, workdir)`, with evaluation and checkpoints."""

import math
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from jax.experimental import multihost_utils

from vit_jax import checkpoint
from vit_jax import storage
from vit_jax.cpu import scheduler
from vit_jax.data import pipeline
from vit_jax.training import fewshot
from vit_jax.training import memory
from vit_jax.training import metrics as metrics_lib
from vit_jax.training import optim
from vit_jax.training import preemption
from vit_jax.training.steps import DivergenceError, TrainState
from vit_jax.training import sharding
from vit_jax.training.setup import seed_rngs, setup
from vit_jax.training.platform import attention_implementation


def evaluate(eval_fn, params, config, split, batch_sharding, prefix: str = 'eval') -> dict[str, float]:
  """Accuracy and loss over every example of the eval split, exactly once, as `prefix`/accuracy, ...

  The loop evaluates the EMA parameters (config.ema) with prefix 'eval_ema'.
  """
  totals = None
  for local in pipeline.eval_iterator(config, split, jax.process_index(), jax.process_count()):
    sums = eval_fn(params, sharding.global_batch(local, batch_sharding))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {f'{prefix}/accuracy': float(totals['correct']) / count,
          f'{prefix}/loss': float(totals['loss']) / count, f'{prefix}/num_examples': count}


def _fetch_checked(step: int, step_metrics: dict) -> dict[str, float]:
  """Host copy of the step's metrics; raises DivergenceError if any is not finite."""
  values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
  if not all(math.isfinite(v) for v in values.values()):
    raise DivergenceError(
        f'Training diverged at step {step}: non-finite loss or gradient norm ({values}). Nothing '
        'from this step was saved; the last good checkpoint is kept. Lower '
        'config.optimizer.learning_rate or raise config.optimizer.warmup_steps.')
  return values


def _memory_fix(config: ml_collections.ConfigDict, num_devices: int) -> str:
  """What lowers a train step's memory, for the error of a step that does not fit."""
  options = []
  if config.batch_size % (config.accumulation_steps * 2 * num_devices) == 0:
    options.append(f'config.accumulation_steps={config.accumulation_steps * 2} (the same update in '
                   'smaller micro-batches)')
  if config.model.remat in (False, 'none') or not config.model.scan:
    options.append('config.model.remat=True with config.model.scan=True')
  options.append('a smaller config.batch_size')
  return 'Use ' + ', or '.join(options) + '.'


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_signals=preemption.DEFAULT_SIGNALS,
                       discard_damaged: bool = False,
                       stop: Optional[preemption.StopRequest] = None) -> dict[str, float]:
  """Trains (or resumes) in `workdir` until `config.total_steps`; returns the final metrics.

  Any of `stop_signals` makes it save a checkpoint and return (vit_jax/training/preemption.py);
  `stop` is a request already installed (the launcher's, from its start) to use instead, on which
  the loop records the step it stopped at (`stopped_at`). A request made before the first step
  stops the run there, with nothing new to save.
  A workdir whose checkpoints cannot be read now (I/O or permission errors,
  out of memory) stops the run before anything is written; one whose every
  checkpoint is damaged stops too, unless `discard_damaged` (`vit-jax train
  --discard_damaged`): then they are set aside and the run starts over.
  """
  mesh = sharding.make_mesh(config)
  run = setup(config, mesh)
  warning = optim.warmup_warning(config)
  if warning and jax.process_index() == 0:
    print(f'warning: {warning}', file=sys.stderr, flush=True)
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
  fewshot_evaluator = (fewshot.Evaluator(config, run.model, run.state_sharding.params, run.batch_sharding)
                       if config.fewshot.every_steps else None)

  init_rng, dropout_rng = seed_rngs(config)

  def fresh_state() -> TrainState:
    state = jax.jit(run.init_fn, out_shardings=run.state_sharding)(init_rng)
    # Fine-tuning hook: pretrained params from config.init.path (no-op when '').
    state = checkpoint.init_from_pretrained(state, config)
    if state.ema_params is not None and config.init.path:
      # The average starts from the pretrained params too (a copy: the state's buffers are donated).
      state = state.replace(ema_params=jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                                               out_shardings=run.state_sharding.ema_params)(state.params))
    return state

  # A new run builds its state (and reads any pretrained file) before it
  # writes anything, so a bad config.init.path leaves no trace.
  state = None if checkpoint.has_checkpoints(workdir) else fresh_state()
  storage.makedirs(workdir)
  manager = checkpoint.create_manager(workdir, config)
  if state is None:
    state = checkpoint.restore_latest(manager, sharding.placed(run.abstract_state, run.state_sharding),
                                      config, discard_damaged=discard_damaged)
    if state is None:  # Every checkpoint was damaged and set aside, as asked (discard_damaged).
      state = fresh_state()
    elif is_main:
      print(f'Resuming from the checkpoint at step {int(state.step)} in {workdir}.', flush=True)
  start_step = int(state.step)
  if start_step >= config.total_steps:  # Finished: nothing to train, and nothing is written.
    checkpoint.finish(manager)
    if is_main:
      changes = checkpoint.config_changes(checkpoint.saved_config(workdir), config)
      print(f'The run in {workdir} is finished: its checkpoint is at step {start_step} and '
            f'config.total_steps={config.total_steps}; nothing to train, nothing changed.'
            + (f' Not applied: {checkpoint.format_changes(changes)}. Raise --config.total_steps to train on, '
               f'or start a new --workdir with --config.init.path={workdir}.' if changes else ''), flush=True)
    return metrics_lib.recorded(workdir, start_step)  # Its final metrics, as when it finished.
  if is_main:
    checkpoint.record_config(workdir, config, start_step)

  train_iter = pipeline.train_iterator(config, train_split, start_step,
                                             jax.process_index(), jax.process_count())
  first_batch = sharding.global_batch(next(train_iter), run.batch_sharding)
  platform = mesh.devices.flat[0].platform
  # Compiled once, ahead of time: every step reuses this executable. On CPU, with the scheduler
  # whose plan fits in the host's free memory (vit_jax/cpu/scheduler.py).
  compiled = scheduler.compile_within_memory(
      run.step_fn.lower(state, first_batch, dropout_rng), platform=platform,
      local_devices=len(mesh.local_devices), choice=config.cpu_scheduler, fix=_memory_fix(config, mesh.size),
      agree=sharding.any_process)
  compiled_step = compiled.program
  if is_main:
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(run.abstract_state.params))
    print(f'Model {config.model.variant}: {num_params:,} parameters; {len(train_split):,} training '
          f'and {len(eval_split):,} eval examples; {jax.device_count()} devices '
          f'(mesh data={mesh.shape["data"]}, fsdp={mesh.shape["fsdp"]}), {jax.process_count()} processes.',
          flush=True)
    print(attention_implementation(config) + '.', flush=True)
    if platform == 'cpu':
      print(f'XLA:CPU scheduler: {compiled.reason}.', flush=True)
    print(memory.format_report(memory.report(run.abstract_state, run.state_sharding, compiled_step)),
          flush=True)

  writer = metrics_lib.MetricWriter(workdir, enabled=is_main, resume_step=start_step)
  progress = metrics_lib.Progress(config.total_steps, start_step)
  final: dict[str, float] = {}
  batch = first_batch
  try:
    with stop or preemption.StopRequest(stop_signals) as stop:
      if stop.agreed():  # Asked while the run started up: all processes stop before training.
        stop.stopped_at = start_step
        if is_main:
          print(f'Received {stop.signal_name or "a stop request"} before the first step: nothing new was '
                f'saved in {workdir}; run the same command to resume.', flush=True)
        return final
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
          if state.ema_params is not None:  # In the same row; config.best_metric may be 'eval_ema/accuracy'.
            eval_metrics.update(evaluate(run.eval_fn, state.ema_params, config, eval_split,
                                         run.batch_sharding, prefix='eval_ema'))
          writer.write(step, eval_metrics)
          final.update(eval_metrics)
          if is_main:
            print(f'eval at step {step}: accuracy {eval_metrics["eval/accuracy"]:.4f} | loss '
                  f'{eval_metrics["eval/loss"]:.4f} | {int(eval_metrics["eval/num_examples"])} examples',
                  flush=True)
            if state.ema_params is not None:
              print(f'eval_ema at step {step}: accuracy {eval_metrics["eval_ema/accuracy"]:.4f} | loss '
                    f'{eval_metrics["eval_ema/loss"]:.4f}', flush=True)
          progress.rate(step)  # Exclude eval time from the next throughput figure.

        if fewshot_evaluator and (step % config.fewshot.every_steps == 0 or is_last):
          fewshot_metrics = fewshot_evaluator.run(state.params)
          writer.write(step, fewshot_metrics)
          final.update(fewshot_metrics)
          if is_main:
            print(f'few-shot at step {step}: ' + ' | '.join(
                f'{key.removeprefix("fewshot/")} {value:.4f}' for key, value in fewshot_metrics.items()
                if key != 'fewshot/seconds') + f' ({fewshot_metrics["fewshot/seconds"]:.1f} s)', flush=True)
          progress.rate(step)  # Exclude few-shot time from the next throughput figure.

        if is_checkpoint:
          checkpoint.save(manager, step, state, eval_metrics)
        if stopping and not is_last:
          stop.stopped_at = step
          if is_main:
            print(f'Received {stop.signal_name or "a stop request"}: saved the checkpoint of step '
                  f'{step} in {workdir}; run the same command to resume.', flush=True)
          break
  finally:
    writer.close()
    checkpoint.finish(manager)
  if stop.stopped_at is not None and jax.process_count() > 1:
    # A stopped launcher exits non-zero, on which `srun --kill-on-bad-exit` ends the processes still
    # running: none leaves before every one has finished its part of the save.
    multihost_utils.sync_global_devices('stopped_and_saved')
  return final
