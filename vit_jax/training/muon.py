"""Muon (Jordan et al. 2024) for the encoder's matrices, AdamW for everything else.

`config.optimizer.name='muon'`: the kernels of the encoder blocks (attention
query/key/value/out, MLP) take `optax.contrib.muon`'s update: Nesterov
momentum, orthogonalised by a Newton-Schulz iteration, scaled by the
kernel's shape. The patch embedding, position embeddings, class token,
registers, norms, biases, LayerScale, the MAP head, pre-logits and the head
take AdamW, the same AdamW as `name='adamw'` (b1, b2, weight decay of
kernels only), as Muon's authors use it: Muon is meant for the hidden
layers' matrices. Both follow the one learning-rate schedule.

Each kernel is orthogonalised as the matrix it multiplies by: query, key and
value kernels (dim, heads, head_dim) as (dim, heads * head_dim), `out`
(heads, head_dim, dim) as (heads * head_dim, dim), MLP kernels as they are;
under `config.model.scan` the leading layer axis is a batch of independent
matrices. With `muon_consistent_rms` (default 0.2, Liu et al. 2025,
"Muon is scalable for LLM training") an update's RMS is that of a typical
AdamW update, so AdamW's learning rate and weight decay fit both halves.
"""

from typing import Any, Callable, Optional

import jax
import ml_collections
import optax
from optax.contrib import MuonDimensionNumbers

# Kernels whose reduction axes are their first two: DenseGeneral over (heads, head_dim).
_TWO_INPUT_AXES = ('out',)


def dimension_numbers(path, leaf: Any) -> Optional[MuonDimensionNumbers]:
  """How Muon sees the parameter at `path` (a key path): None for AdamW's parameters, else
  its reduction (input) and output axes; any other axis (scan's layers) is a batch axis."""
  names = [str(getattr(key, 'key', key)) for key in path]
  if len(names) < 4 or names[0] != 'Transformer' or not names[1].startswith('encoderblock'):
    return None
  if names[-1] != 'kernel':
    return None
  shift = 1 if names[1] == 'encoderblock' else 0  # Scan layout: a leading layer axis.
  rank = len(leaf.shape) - shift
  inputs = 2 if names[-2] in _TWO_INPUT_AXES else 1
  if rank < 2:
    return None
  reduction = tuple(range(shift, shift + inputs))
  output = tuple(range(shift + inputs, shift + rank))
  return MuonDimensionNumbers(reduction_axis=reduction, output_axis=output)


def muon_labels(params: Any) -> Any:
  """'muon' for the encoder's kernels, 'adamw' for every other parameter."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: 'muon' if dimension_numbers(path, leaf) else 'adamw', params)


def _muon_dimension_numbers(params: Any) -> Any:
  # Called by optax on the Muon half's masked tree: its leaves are the encoder's kernels alone.
  return jax.tree_util.tree_map_with_path(dimension_numbers, params)


def create_muon(config: ml_collections.ConfigDict, schedule: optax.Schedule,
                decay_mask: Callable) -> optax.GradientTransformation:
  """Muon for the encoder's kernels and AdamW (`decay_mask` for its weight decay) for the rest."""
  opt = config.optimizer
  muon = optax.contrib.muon(
      schedule, ns_steps=opt.muon_ns_steps, beta=opt.muon_beta, weight_decay=opt.weight_decay,
      consistent_rms=opt.muon_consistent_rms or None, muon_weight_dimension_numbers=_muon_dimension_numbers)
  adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=decay_mask)
  return optax.partition({'muon': muon, 'adamw': adamw}, muon_labels)
