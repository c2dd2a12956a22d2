"""2-D rotary position embeddings (RoPE) of queries and keys: axial and mixed (Heo et al. 2024).

`config.model.posemb` names an absolute embedding ('learn', 'sincos2d',
'none'), a rotary one ('rope_axial', 'rope_mixed'), or both joined by '+'
('learn+rope_axial'): `split_posemb` parses it.

Each head's query and key vectors are read as head_dim / 2 pairs, and pair j
of a token at patch (row, column) is rotated by the angle
`column * f_x[j] + row * f_y[j]`. With 'rope_axial' the frequencies are fixed:
the first half of the pairs turn with the column, the second half with the
row, at RoPE-ViT's frequencies 100^(-4i/head_dim). With 'rope_mixed' (f_x, f_y)
are learned per block and head (`Rotary/freqs`, shape (2, heads, head_dim/2)),
initialised at magnitudes 10^(-4i/head_dim) in a random direction per head, so
that heads see diagonal directions too. Positions are in patch units, so a
model trained on one grid runs on another with nothing resized. Tokens before
the patches (class token, registers) get position (0, 0): no rotation, as in
timm's ViTs.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

ABSOLUTE = ('learn', 'sincos2d', 'none')
ROTARY = ('rope_axial', 'rope_mixed')
# Every value of `config.model.posemb`.
POSEMBS = ABSOLUTE + ROTARY + tuple(f'{a}+{r}' for a in ('learn', 'sincos2d') for r in ROTARY)
AXIAL_THETA = 100.0  # RoPE-ViT's base of the fixed (axial) frequencies.
MIXED_THETA = 10.0  # And of the learned (mixed) ones' initial magnitudes.


def split_posemb(posemb: str) -> tuple[str, str]:
  """'learn+rope_axial' -> ('learn', 'rope_axial'); 'rope_mixed' -> ('none', 'rope_mixed');
  'learn' -> ('learn', ''). Raises ValueError listing `POSEMBS` for anything else."""
  if posemb not in POSEMBS:
    raise ValueError(f'Unknown posemb {posemb!r}; use one of {", ".join(POSEMBS)}.')
  absolute, _, rotary = posemb.rpartition('+') if '+' in posemb else (posemb, '', '')
  if absolute in ROTARY:
    absolute, rotary = 'none', absolute
  return absolute, rotary


def magnitudes(head_dim: int, theta: float) -> np.ndarray:
  """theta^(-4i/head_dim) for i < head_dim / 4: the frequencies of one axis (RoPE-ViT's)."""
  if head_dim % 4:
    raise ValueError(f'2-D RoPE needs a head size divisible by 4, got {head_dim}.')
  return (1.0 / theta ** (np.arange(0, head_dim, 4)[:head_dim // 4] / head_dim)).astype(np.float32)


def axial_frequencies(num_heads: int, head_dim: int) -> np.ndarray:
  """(2, heads, head_dim / 2) fixed (f_x, f_y): columns turn the first half of the pairs, rows the second."""
  m = magnitudes(head_dim, AXIAL_THETA)
  zeros = np.zeros_like(m)
  f = np.stack([np.concatenate([m, zeros]), np.concatenate([zeros, m])])  # (2, head_dim / 2)
  return np.broadcast_to(f[:, None], (2, num_heads, head_dim // 2)).copy()


def mixed_init(key: jax.Array, shape: tuple[int, int, int], dtype=jnp.float32) -> Array:
  """RoPE-ViT's initial mixed frequencies: per head a random angle a; the pairs' first half turns
  along direction a, the second half along a + 90 degrees, at `magnitudes(head_dim, 10)`."""
  _, num_heads, half = shape
  m = jnp.asarray(magnitudes(2 * half, MIXED_THETA))
  angle = jax.random.uniform(key, (num_heads, 1), jnp.float32) * 2 * np.pi
  f_x = jnp.concatenate([m * jnp.cos(angle), m * jnp.cos(angle + np.pi / 2)], axis=-1)
  f_y = jnp.concatenate([m * jnp.sin(angle), m * jnp.sin(angle + np.pi / 2)], axis=-1)
  return jnp.stack([f_x, f_y]).astype(dtype)


def rotate(x: Array, angles: Array) -> Array:
  """Rotates the pairs (x[2j], x[2j+1]) of x (batch, tokens, heads, head_dim) by angles
  (batch or 1, tokens, heads, head_dim / 2), computed in float32; returns x's dtype."""
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  a, b = pairs[..., 0], pairs[..., 1]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


def grid_positions(rows: int, columns: int) -> np.ndarray:
  """(rows * columns, 2) (row, column) of each patch, row-major as the patch tokens."""
  r, c = np.mgrid[:rows, :columns]
  return np.stack([r.reshape(-1), c.reshape(-1)], axis=-1).astype(np.float32)


class Rotary(nn.Module):
  """Rotates queries and keys by their tokens' 2-D positions. `mode`: 'rope_axial' or 'rope_mixed'.

  `__call__(q, k, positions)`: q, k (batch, tokens, heads, head_dim); positions
  (batch or 1, tokens, 2) as (row, column) in patch units. Returns the rotated (q, k).
  """

  mode: str

  @nn.compact
  def __call__(self, q: Array, k: Array, positions: Array) -> tuple[Array, Array]:
    _, _, heads, head_dim = q.shape
    if self.mode == 'rope_mixed':
      freqs = self.param('freqs', mixed_init, (2, heads, head_dim // 2), jnp.float32)
    elif self.mode == 'rope_axial':
      freqs = jnp.asarray(axial_frequencies(heads, head_dim))
    else:
      raise ValueError(f'Unknown rotary mode {self.mode!r}; use one of {", ".join(ROTARY)}.')
    # angle = column * f_x + row * f_y, per token, head and pair.
    yx = positions.astype(jnp.float32)
    angles = (yx[..., 1, None, None] * freqs[0] + yx[..., 0, None, None] * freqs[1])
    return rotate(q, angles), rotate(k, angles)


def token_positions(patch_positions: Array, num_prefix: int) -> Array:
  """(batch or 1, prefix + patches, 2): `num_prefix` tokens at (0, 0), then the patches' positions."""
  b = patch_positions.shape[0]
  return jnp.concatenate([jnp.zeros((b, num_prefix, 2), patch_positions.dtype), patch_positions], axis=1)


def static_positions(grid: tuple[int, int], num_prefix: int) -> Array:
  """`token_positions` for every image on one (rows, columns) grid, (1, prefix + patches, 2)."""
  return token_positions(jnp.asarray(grid_positions(*grid))[None], num_prefix)


__all__ = ['ABSOLUTE', 'POSEMBS', 'ROTARY', 'Rotary', 'axial_frequencies', 'grid_positions', 'magnitudes',
           'mixed_init', 'rotate', 'split_posemb', 'static_positions', 'token_positions']
