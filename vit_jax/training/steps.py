"""The train state and the pure, jittable steps: `train_step(state, batch, rng)` and `eval_step`.

Imports no TensorFlow and no data pipeline, so a notebook's own loop can use
them with `jax.jit` alone.
"""

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vit_jax.config.sizes import image_hw
from vit_jax.models.flexi import resize_params as flexi_params
from vit_jax.training import flexi


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  # Exponential moving average of `params` (config.ema); None when off, so
  # that the state, and its checkpoints, are then the same tree as without EMA.
  ema_params: Any = None


class DivergenceError(RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


def create_train_state(rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation,
                       image_size, ema: bool = False) -> TrainState:
  """A fresh train state. Pure: meant for `jax.eval_shape` and `jax.jit(out_shardings=...)`.

  `image_size` is one side or (height, width), as `config.input.image_size`.

  With `ema`, the averaged parameters start equal to the initial ones.
  """
  params = model.init(rng, jnp.zeros((1, *image_hw(image_size), 3), jnp.float32))['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree.map(jnp.copy, params) if ema else None)


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
  """The EMA decay of the update after `step` updates: `decay`, or with `warmup`
  min(decay, (1 + step) / (10 + step)), so early averages forget the random init fast."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


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
               model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
               label_smoothing: float, accumulation_steps: int = 1, frozen: Any = None,
               ema_decay: float = 0.0, ema_warmup: bool = False,
               patch_models: tuple = ()) -> tuple[TrainState, dict]:
  """One optimizer step on a global batch. Returns the new state and scalar metrics.

  With `accumulation_steps` k > 1 the batch is split into k micro-batches
  (example i goes to micro-batch i % k, so each is spread over all devices)
  whose gradients are averaged: the same update as the full batch, with the
  activations of one micro-batch in memory at a time.

  `frozen` (a tree of Python bools like the params, from
  `optim.frozen_mask`) stops the gradient of the frozen parameters, so the
  compiler drops the backward pass they alone need (for a linear probe, all of
  it but the head's). With `ema_decay` > 0 the state's `ema_params` move
  towards the new params: ema = d * ema + (1 - d) * params.

  `patch_models` (FlexiViT, vit_jax/training/flexi.py): the model at each
  patch size; each step trains at one of them, drawn from `rng` and the step,
  on the parameters PI-resized to it, and reports it as `train/patch_size`.
  """
  rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params, micro_batch, micro_rng, model=model):
    if frozen is not None:
      params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
    if patch_models:  # FlexiViT: the shared parameters at this branch's patch size.
      params = flexi_params(params, model.patch_size, micro_batch['image'].shape[1:3])
    logits, _ = model.apply({'params': params}, micro_batch['image'], train=True,
                            rngs={'dropout': micro_rng})
    return cross_entropy(logits, micro_batch['label'], label_smoothing).mean()

  grad_fn = jax.value_and_grad(loss_fn)
  extra_metrics = {}
  if patch_models:
    index = flexi.patch_size_index(rng, len(patch_models))
    grad_fn = flexi.switch(index, [jax.value_and_grad(functools.partial(loss_fn, model=m))
                                   for m in patch_models])
    extra_metrics['train/patch_size'] = flexi.patch_size_metric(index, patch_models)
  if accumulation_steps == 1:
    loss, grads = grad_fn(state.params, batch, rng)
  else:
    k = accumulation_steps
    micro_batches = jax.tree.map(
        lambda x: x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1), batch)

    def accumulate(carry, inputs):
      index, micro_batch = inputs
      loss, grads = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, index))
      return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
    (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(k), micro_batches))
    loss, grads = jax.tree.map(lambda x: x / k, (loss, grads))

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = state.ema_params
  if ema_decay > 0:
    d = ema_decay_at(state.step, ema_decay, ema_warmup)
    ema_params = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)
  return new_state, {'train/loss': loss, 'train/grad_norm': optax.tree.norm(grads),
                     'train/lr': schedule(state.step), **extra_metrics}


def eval_step(params: Any, batch: dict[str, jax.Array], *, model: nn.Module) -> dict[str, jax.Array]:
  """Sums over the real (mask = 1) examples of a padded eval batch."""
  logits, _ = model.apply({'params': params}, batch['image'], train=False)
  mask = batch['mask']
  correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
  return {'correct': (correct * mask).sum(),
          'loss': (cross_entropy(logits, batch['label']) * mask).sum(),
          'count': mask.sum()}
