"""What a ViT looks at: attention rollout and last-layer per-head attention maps.

Attention rollout (Abnar & Zuidema, 2020, "Quantifying Attention Flow in
Transformers") follows attention through the layers: each layer's weights are
averaged over heads, the identity is added for the residual connection, rows
are re-normalised to sum to one, and the layers are multiplied together, last
layer on the left. Row `i` of the result says how much output token `i`
draws on each input token.

Which output token to read depends on how the model pools: a class-token
model (`pool='token'`) classifies from token 0, so its row is used; a pooled
model (`gap`) classifies from all patch tokens, so the mean of the patch rows
is used; an attention-pooled model (`map`) reads the tokens with its head's
probe, whose attention weights the rows. Prefix tokens (class token, register tokens) sit before the
patches; their columns are dropped and the patch columns re-normalised, so a
map is a distribution over the image. Maps are returned at the model input's
resolution (each patch's weight spread evenly over its pixels: a map still
sums to one).
"""

import os
from typing import Any, Sequence

import numpy as np


def num_prefix_tokens(model: Any) -> int:
  """Tokens before the patches: the class token (pool 'token') plus any register tokens."""
  registers = getattr(model, 'num_registers', 0) or 0
  return (1 if model.pool == 'token' else 0) + int(registers)


def rollout(attention: Sequence[Any]) -> np.ndarray:
  """Attention rollout of per-layer weights, first layer first.

  attention: per layer, (batch, heads, tokens, tokens) with rows summing to one.
  Returns (batch, tokens, tokens): rows sum to one.
  """
  if not attention:
    raise ValueError('rollout needs the attention weights of at least one layer.')
  result = None
  for weights in attention:
    a = np.asarray(weights, np.float64).mean(axis=1)  # (batch, tokens, tokens)
    a = a + np.eye(a.shape[-1])  # The residual connection carries each token to itself.
    a = a / a.sum(axis=-1, keepdims=True)
    result = a if result is None else a @ result
  return result.astype(np.float32)


def query_rows(matrix: np.ndarray, pool: str, num_prefix: int) -> np.ndarray:
  """The row(s) the classifier reads: token 0 for pool 'token', else the mean of the patch rows.

  matrix: (..., tokens, tokens). Returns (..., tokens).
  """
  if pool == 'token':
    return matrix[..., 0, :]
  return matrix[..., num_prefix:, :].mean(axis=-2)


def to_image_map(rows: np.ndarray, num_prefix: int, grid: tuple[int, int], patch_size: int) -> np.ndarray:
  """Patch columns of `rows` (..., tokens), re-normalised, as (..., height, width) pixel maps.

  Each patch's weight is spread evenly over its patch_size x patch_size pixels,
  so every map sums to one over the image.
  """
  patches = rows[..., num_prefix:]
  patches = patches / patches.sum(axis=-1, keepdims=True)
  patches = patches.reshape(patches.shape[:-1] + grid)  # (..., grid_h, grid_w)
  pixels = np.repeat(np.repeat(patches, patch_size, axis=-2), patch_size, axis=-1)
  return pixels / patch_size**2


def attention_maps(intermediates: dict[str, Any], model: Any, image_shape: tuple[int, int]
                   ) -> dict[str, np.ndarray]:
  """Rollout and last-layer per-head maps of a batch, at the input's spatial shape.

  intermediates: the model's, called with `return_attention=True`: 'attention'
  (per layer, (batch, heads, tokens, tokens)) and, for pool 'map',
  'map_attention' (batch, heads, 1, tokens). The pooling head's probe is then
  the query that reads the tokens: its head-averaged attention weights the
  rollout rows, and its heads are the "last layer" heads.
  image_shape: (height, width) of the model input.
  Returns {'rollout': (batch, height, width), 'heads': (batch, heads, height, width)};
  each map sums to one.
  """
  attention = intermediates['attention']
  height, width = image_shape
  # Pixels per token: the patch size, times the ResNet's stride for a hybrid (its
  # tokens are cells of the ResNet's feature map).
  p = getattr(model, 'pixels_per_token', model.patch_size)
  grid = (height // p, width // p)
  prefix = num_prefix_tokens(model)
  tokens = np.asarray(attention[-1]).shape[-1]
  if tokens != prefix + grid[0] * grid[1]:
    raise ValueError(f'Attention over {tokens} tokens does not match {prefix} prefix tokens plus a '
                     f'{grid[0]}x{grid[1]} patch grid; is image_shape {image_shape} the model input?')
  rolled = rollout(attention)  # (batch, tokens, tokens)
  probe = intermediates.get('map_attention')
  if probe is not None:
    last = np.asarray(probe, np.float32)[:, :, 0, :]  # (batch, heads, tokens)
    rows = np.einsum('bt,bts->bs', last.mean(axis=1), rolled)
  else:
    rows = query_rows(rolled, model.pool, prefix)  # (batch, tokens)
    last = query_rows(np.asarray(attention[-1], np.float32), model.pool, prefix)  # (batch, heads, tokens)
  return {'rollout': to_image_map(rows, prefix, grid, p), 'heads': to_image_map(last, prefix, grid, p)}


def display_image(image: np.ndarray) -> np.ndarray:
  """A model input (height, width, channels) rescaled to [0, 1] for display.

  Min-max per image, so it works whatever normalization the config uses.
  """
  image = np.asarray(image, np.float32)
  low, high = image.min(), image.max()
  return (image - low) / (high - low) if high > low else np.zeros_like(image)


def save_maps(out_dir: str, name: str, image: np.ndarray, maps: dict[str, np.ndarray],
              title: str = '') -> dict[str, str]:
  """Writes NAME_attention.png (input, rollout and per-head overlays) and NAME_rollout.npy,
  NAME_heads.npy into `out_dir`.

  image: (height, width, channels) in [0, 1]; maps: one example's
  {'rollout': (height, width), 'heads': (heads, height, width)}.
  Returns the paths written, by kind ('png', 'rollout', 'heads').
  """
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  os.makedirs(out_dir, exist_ok=True)
  paths = {kind: os.path.join(out_dir, f'{name}_{suffix}') for kind, suffix in
           (('png', 'attention.png'), ('rollout', 'rollout.npy'), ('heads', 'heads.npy'))}
  np.save(paths['rollout'], maps['rollout'].astype(np.float32))
  np.save(paths['heads'], maps['heads'].astype(np.float32))

  panels = [('input', None), ('rollout', maps['rollout'])]
  panels += [(f'last layer, head {h + 1}', m) for h, m in enumerate(maps['heads'])]
  fig, axes = plt.subplots(1, len(panels), figsize=(1.9 * len(panels), 2.2), squeeze=False)
  shown = image[..., 0] if image.shape[-1] == 1 else image
  for ax, (label, heat) in zip(axes[0], panels):
    ax.imshow(shown, cmap='gray', vmin=0, vmax=1, interpolation='nearest')
    if heat is not None:
      # Scaled to its own maximum: the pattern matters here, the absolute level is in the .npy.
      ax.imshow(heat / heat.max(), cmap='inferno', alpha=0.6, vmin=0, vmax=1, interpolation='nearest')
    ax.set_title(label, fontsize=8)
    ax.axis('off')
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(paths['png'], dpi=80)
  plt.close(fig)
  return paths
