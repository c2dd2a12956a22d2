"""The optax optimizer and learning-rate schedule, built from `config.optimizer`."""

import jax
import ml_collections
import optax

from vit_jax.errors import UsageError


def create_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up to the peak, then cosine, linear or constant until total_steps."""
  opt = config.optimizer
  warmup = min(opt.warmup_steps, config.total_steps)
  decay_steps = max(config.total_steps - warmup, 1)
  if opt.schedule == 'cosine':
    alpha = opt.end_learning_rate / opt.learning_rate if opt.learning_rate else 0.0
    decay = optax.cosine_decay_schedule(opt.learning_rate, decay_steps, alpha=alpha)
  elif opt.schedule == 'linear':
    decay = optax.linear_schedule(opt.learning_rate, opt.end_learning_rate, decay_steps)
  elif opt.schedule == 'constant':
    decay = optax.constant_schedule(opt.learning_rate)
  else:
    raise UsageError(f"Unknown config.optimizer.schedule {opt.schedule!r}; "
                     "use 'cosine', 'linear' or 'constant'.")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, opt.learning_rate, warmup), decay], [warmup])


def decay_mask(params):
  """True for the weights that get weight decay: kernels of at least 2 dims.

  Biases, LayerNorm scales, the class token and position embeddings are
  excluded, as in the published ViT training code.
  """
  def is_decayed(path, leaf):
    name = jax.tree_util.keystr(path[-1:], simple=True)
    return name == 'kernel' and leaf.ndim >= 2
  return jax.tree_util.tree_map_with_path(is_decayed, params)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Returns the optax chain: optional global-norm clipping, then AdamW or SGD-momentum."""
  opt = config.optimizer
  schedule = create_schedule(config)
  if opt.name == 'adamw':
    tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=decay_mask)
  elif opt.name == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(opt.weight_decay, mask=decay_mask),
                     optax.sgd(schedule, momentum=opt.momentum))
  else:
    raise UsageError(f"Unknown config.optimizer.name {opt.name!r}; use 'adamw' or 'sgd'.")
  if opt.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx
