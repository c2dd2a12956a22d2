"""The library path: a user's own train step on the public API, as a notebook writes it.

`vit-jax benchmark --loop library` (and `vit-jax benchmark-timm --loops
library`) time this instead of the launcher's step (`vit_jax.training.setup`):
`vit_jax.create_model`, an optax AdamW with gradient clipping at 1.0 (the
launcher's default optimizer, as timm's side of the comparison), and one
`jax.jit` with the parameters and optimizer state donated. No config, mesh,
sharding or launcher settings are involved, so the rows show what a user who
imports the package gets. Whether the process calls
`vit_jax.retain_freed_memory()` first (the one call the README
asks a notebook on CPU to make) is the caller's choice: the benchmark command
makes it unless VIT_JAX_RETAIN_HOST_MEMORY=0.
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

import vit_jax


class TrainState(NamedTuple):
  params: Any
  opt_state: Any


class Program(NamedTuple):
  """What `workload.Workload` times: `function(*args)` is one step (or one forward pass)."""
  model: Any
  function: Callable
  state: TrainState
  rng: jax.Array


def build(variant: str, batch: dict[str, Any], dtype: str, mode: str,
          model_options: Optional[dict[str, Any]] = None) -> Program:
  """The notebook's model, state and jitted step for `batch` ({'image', 'label'} numpy arrays).

  In 'train' mode the function is `step(state, batch, rng) -> (state, loss)`;
  in 'inference' mode `forward(params, images) -> logits`.
  """
  # config.model.attention is the launcher's per-platform choice (vit_jax/training/platform.py): a
  # notebook's `create_model` is the plain model.
  options = {k: v for k, v in (model_options or {}).items() if k != 'attention'}
  model = vit_jax.create_model(variant, 1000, dtype=jnp.dtype(dtype), **options)
  images = jnp.asarray(batch['image'])
  params = jax.jit(lambda key: model.init(key, images[:1], train=False)['params'])(jax.random.key(0))
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 100, 10_000),
                                      weight_decay=1e-4))

  def loss_fn(params, batch, rng):
    logits, _ = model.apply({'params': params}, batch['image'], train=True, rngs={'dropout': rng})
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()

  def step(state: TrainState, batch, rng):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), opt_state), loss

  def forward(params, images):
    return model.apply({'params': params}, images, train=False)[0]

  state = TrainState(params, optimizer.init(params))
  function = jax.jit(step, donate_argnums=0) if mode == 'train' else jax.jit(forward)
  return Program(model, function, state, jax.random.key(1))
