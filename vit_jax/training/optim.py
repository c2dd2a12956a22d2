"""The optax optimizer and learning-rate schedule, built from `config.optimizer`."""

import re
from typing import Any

import jax
import ml_collections
import optax

from vit_jax.errors import UsageError
from vit_jax.training import muon


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


def warmup_warning(config: ml_collections.ConfigDict) -> str | None:
  """A warning when the warm-up takes the whole run (the rate never reaches its peak), else None."""
  opt = config.optimizer
  if opt.warmup_steps < config.total_steps:
    return None
  return (f'config.optimizer.warmup_steps={opt.warmup_steps} is not shorter than config.total_steps='
          f'{config.total_steps}: the whole run is warm-up, so the learning rate never reaches its '
          f'peak {opt.learning_rate:g}; lower warmup_steps (e.g. --config.optimizer.warmup_steps='
          f'{config.total_steps // 10}).')


def decay_mask(params):
  """True for the weights that get weight decay: kernels of at least 2 dims.

  Biases, LayerNorm scales, the class token and position embeddings are
  excluded, as in the published ViT training code.
  """
  def is_decayed(path, leaf):
    name = jax.tree_util.keystr(path[-1:], simple=True)
    return name == 'kernel' and leaf.ndim >= 2
  return jax.tree_util.tree_map_with_path(is_decayed, params)


def parameter_path(path) -> str:
  """'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel': the name `config.optimizer.freeze` matches."""
  return '/'.join(str(getattr(key, 'key', key)) for key in path)


def frozen_mask(params: Any, pattern: str) -> Any:
  """True for the parameters whose path `re.search(pattern, path)` finds; all False for pattern ''.

  Fails with a UsageError for a pattern that is not a regular expression, or
  that matches no parameter or every parameter (nothing left to train), so
  that a misspelt pattern does not silently train the whole model.
  """
  if not pattern:
    return jax.tree.map(lambda _: False, params)
  try:
    compiled = re.compile(pattern)
  except re.error as e:
    raise UsageError(f'config.optimizer.freeze={pattern!r} is not a regular expression ({e}).') from None
  mask = jax.tree_util.tree_map_with_path(lambda path, _: bool(compiled.search(parameter_path(path))), params)
  flags = jax.tree.leaves(mask)
  if not any(flags) or all(flags):
    paths = [parameter_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    raise UsageError(
        f'config.optimizer.freeze={pattern!r} matches {"no" if not any(flags) else "every"} parameter; '
        f'it is searched in paths such as {", ".join(paths[:2])}, ..., {paths[-1]} (e.g. '
        "'^(?!head/)' freezes all but the head).")
  return mask


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Returns the optax chain: optional global-norm clipping, then AdamW, SGD-momentum or Muon.

  With `config.optimizer.freeze` set, the parameters it matches are frozen:
  their updates are zero and they get no optimizer state (no Adam moments,
  no momentum), so a linear probe holds optimizer state for the head alone.
  """
  opt = config.optimizer
  schedule = create_schedule(config)
  if opt.name == 'adamw':
    tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=decay_mask)
  elif opt.name == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(opt.weight_decay, mask=decay_mask),
                     optax.sgd(schedule, momentum=opt.momentum))
  elif opt.name == 'muon':  # Muon for the encoder's kernels, this AdamW for the rest (muon.py).
    tx = muon.create_muon(config, schedule, decay_mask)
  else:
    raise UsageError(f"Unknown config.optimizer.name {opt.name!r}; use 'adamw', 'sgd' or 'muon'.")
  if opt.freeze:
    labels = lambda params: jax.tree.map(  # noqa: E731
        lambda frozen: 'frozen' if frozen else 'trained', frozen_mask(params, opt.freeze))
    tx = optax.partition({'trained': tx, 'frozen': optax.set_to_zero()}, labels)
  if opt.grad_clip_norm > 0:
    # Frozen parameters' gradients are zero (train_step stops them), so the norm is the trained ones'.
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx
