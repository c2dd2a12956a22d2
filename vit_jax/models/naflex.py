"""Native aspect ratio (NaFlex, as SigLIP 2 and timm's NaFlexViT): the model side.

Any ViT takes, instead of an image batch, a NaFlex batch
`{'patches': (batch, max_tokens, patch * patch * channels), 'grid': (batch, 2)}`:
each image resized (aspect ratio kept) to `grid` = (rows, columns) patches
within a budget of `max_tokens` (vit_jax/data/naflex.py), its patches in
row-major order, each flattened in (row, column, channel) order, and
zero-padded to `max_tokens`. The patch embedding is the same `embedding`
convolution applied to each patch; learned position embeddings (a table on the
model's own grid, `VisionTransformer.posemb_grid`) are resized to each image's
grid by the linear interpolation of `vit_jax.checkpoint.resize_posemb`
(end points aligned; a grid equal to the table's is the table itself),
sine-cosine ones and RoPE are computed from each patch's (row, column).
Attention and pooling see only the `prefix + rows * columns` real tokens of
each sequence (`lengths`): the padding never changes a result.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def is_naflex(images) -> bool:
  """Whether the model's input is a NaFlex batch (a dict with 'patches' and 'grid') rather than images."""
  return isinstance(images, dict)


def embed_patches(patches: Array, patch_size: int, hidden_size: int, dtype) -> Array:
  """(batch, max_tokens, dim) tokens of the flattened patches, by the `embedding` convolution.

  Call inside the ViT's compact `__call__`: the convolution is then its
  `embedding` submodule, the same parameters as for whole images.
  """
  b, n, flat = patches.shape
  channels = flat // (patch_size * patch_size)
  pixels = patches.reshape(b * n, patch_size, patch_size, channels).astype(dtype)
  x = nn.Conv(hidden_size, (patch_size, patch_size), strides=(patch_size, patch_size), padding='VALID',
              dtype=dtype, name='embedding')(pixels)  # (batch * max_tokens, 1, 1, dim)
  return x.reshape(b, n, hidden_size)


def patch_positions(grid: Array, num_tokens: int) -> Array:
  """(batch, num_tokens, 2) float32 (row, column) of each patch token on its image's `grid` (batch, 2);
  padding tokens get positions past the grid, which nothing uses."""
  index = jnp.arange(num_tokens)[None]
  columns = grid[:, 1:2]
  return jnp.stack([index // columns, index % columns], axis=-1).astype(jnp.float32)


def patch_counts(grid: Array) -> Array:
  """(batch,) int32 real patch tokens: rows * columns."""
  return (grid[:, 0] * grid[:, 1]).astype(jnp.int32)


def _source_coordinate(position: Array, size: Array, table_size: int) -> tuple[Array, Array, Array]:
  """Where position (of `size` on the image's grid) samples a table axis of `table_size`:
  (lower index, upper index, weight of the upper), as `np.linspace(0, table_size - 1, size)`."""
  scale = jnp.where(size > 1, (table_size - 1) / jnp.maximum(size - 1, 1).astype(jnp.float32), 0.0)
  source = position * scale
  low = jnp.clip(jnp.floor(source), 0, table_size - 1)
  high = jnp.minimum(low + 1, table_size - 1)
  return low.astype(jnp.int32), high.astype(jnp.int32), source - low


def resized_table(table: Array, table_grid: tuple[int, int], grid: Array, positions: Array) -> Array:
  """Per token, the learned grid table (rows * columns of `table_grid`, dim) resized to its image's
  grid (batch, 2), sampled at its (row, column) `positions` (batch, tokens, 2): (batch, tokens, dim)."""
  rows, columns = table_grid
  table = table.reshape(rows, columns, -1)
  r0, r1, fr = _source_coordinate(positions[..., 0], grid[:, 0:1], rows)
  c0, c1, fc = _source_coordinate(positions[..., 1], grid[:, 1:2], columns)
  fr, fc = fr[..., None], fc[..., None]
  # Linear along rows, then along columns: resize_posemb's order, the same numbers.
  left = table[r0, c0] * (1 - fr) + table[r1, c0] * fr
  right = table[r0, c1] * (1 - fr) + table[r1, c1] * fr
  return left * (1 - fc) + right * fc


def sincos_at(positions: Array, dim: int, temperature: float = 10_000.0) -> Array:
  """`layers.sincos_2d_posemb` at (row, column) `positions` (batch, tokens, 2): (batch, tokens, dim)."""
  omega = 1.0 / temperature ** (np.arange(dim // 4) / (dim // 4 - 1 if dim > 4 else 1))
  omega = jnp.asarray(omega, jnp.float32)
  y = positions[..., 0:1] * omega
  x = positions[..., 1:2] * omega
  return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=-1)


class NaFlexPositionEmbs(nn.Module):
  """Absolute position embeddings of a NaFlex batch: x (batch, prefix + max_tokens, dim) plus each
  token's embedding. 'learn' holds `pos_embedding` (1, prefix + rows * columns of `table_grid`, dim),
  the parameter of `layers.AddPositionEmbs` on that grid; 'sincos2d' is fixed (prefix tokens get none)."""

  kind: str  # 'learn' or 'sincos2d'.
  table_grid: tuple[int, int]
  num_prefix: int

  @nn.compact
  def __call__(self, x: Array, grid: Array) -> Array:
    b, tokens, dim = x.shape
    positions = patch_positions(grid, tokens - self.num_prefix)
    if self.kind == 'sincos2d':
      return x + jnp.pad(sincos_at(positions, dim), ((0, 0), (self.num_prefix, 0), (0, 0))).astype(x.dtype)
    rows, columns = self.table_grid
    table = self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                       (1, self.num_prefix + rows * columns, dim), jnp.float32)
    patches = resized_table(table[0, self.num_prefix:], self.table_grid, grid, positions)
    prefix = jnp.broadcast_to(table[:, :self.num_prefix], (b, self.num_prefix, dim))
    return x + jnp.concatenate([prefix, patches], axis=1).astype(x.dtype)


def masked_mean(x: Array, counts: Array) -> Array:
  """Mean over the first `counts` (batch,) tokens of x (batch, tokens, dim): GAP without the padding."""
  valid = (jnp.arange(x.shape[1])[None] < counts[:, None]).astype(x.dtype)
  return (x * valid[..., None]).sum(axis=1) / jnp.maximum(counts, 1)[:, None].astype(x.dtype)


def key_mask(lengths: Array, num_keys: int) -> Array:
  """(batch, 1, 1, keys) bool: which keys are real, for (batch, heads, queries, keys) logits."""
  return (jnp.arange(num_keys)[None] < lengths[:, None])[:, None, None, :]
