"""The Vision Transformer of Dosovitskiy et al. (2020) in Flax linen.

Parameter names follow the published ViT checkpoints (`embedding`, `cls`,
`Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}/...`,
`Transformer/encoder_norm`, `pre_logits`, `head`) so that `.npz` files of the
original release load without a renaming table.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
DType = Any

# Initialisers of the original release: Xavier-uniform kernels and tiny normal
# biases in the encoder, zero head (so a fresh head starts at uniform logits).
_kernel_init = nn.initializers.xavier_uniform()
_bias_init = nn.initializers.normal(stddev=1e-6)


def sincos_2d_posemb(height: int, width: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding, (1, height * width, dim)."""
  if dim % 4:
    raise ValueError(f'sincos2d position embeddings need hidden_size divisible by 4, got {dim}.')
  y, x = np.mgrid[:height, :width]
  omega = 1.0 / temperature ** (np.arange(dim // 4) / (dim // 4 - 1 if dim > 4 else 1))
  y = y.reshape(-1)[:, None] * omega[None, :]
  x = x.reshape(-1)[:, None] * omega[None, :]
  emb = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return emb[None].astype(np.float32)


class AddPositionEmbs(nn.Module):
  """Adds learned position embeddings (`pos_embedding`, shape (1, tokens, dim))."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    pos_embedding = self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                               (1,) + x.shape[1:], jnp.float32)
    return x + pos_embedding.astype(x.dtype)


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head self-attention with the published parameter layout.

  `query`/`key`/`value` kernels are (dim, heads, head_dim) and `out` is
  (heads, head_dim, dim). Two paths compute the same function:
  `fused` calls `jax.nn.dot_product_attention` (XLA or cuDNN fused kernels);
  `reference` computes each head's softmax(q k^T / sqrt(d)) v explicitly and
  can return the attention weights. The fused path is used unless weights are
  asked for or attention dropout is active in training.
  """

  num_heads: int
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  implementation: str = 'fused'

  @nn.compact
  def __call__(self, x: Array, *, train: bool, return_weights: bool = False):
    dim = x.shape[-1]
    if dim % self.num_heads:
      raise ValueError(f'hidden_size {dim} is not divisible by num_heads {self.num_heads}.')
    head_dim = dim // self.num_heads
    dense = lambda name: nn.DenseGeneral(  # noqa: E731
        (self.num_heads, head_dim), dtype=self.dtype, kernel_init=_kernel_init,
        bias_init=nn.initializers.zeros, name=name)
    q, k, v = dense('query')(x), dense('key')(x), dense('value')(x)  # (batch, tokens, heads, head_dim)

    use_dropout = train and self.dropout_rate > 0
    weights = None
    if self.implementation == 'fused' and not (return_weights or use_dropout):
      y = jax.nn.dot_product_attention(q, k, v)
    elif self.implementation in ('fused', 'reference'):
      y, weights = reference_attention(q, k, v)
      if use_dropout:
        keep = jax.random.bernoulli(self.make_rng('dropout'), 1 - self.dropout_rate, weights.shape)
        dropped = jnp.where(keep, weights / (1 - self.dropout_rate), 0).astype(v.dtype)
        y = jnp.einsum('bhqk,bkhd->bqhd', dropped, v)
    else:
      raise ValueError(f"Unknown attention implementation {self.implementation!r}; "
                       "use 'fused' or 'reference'.")
    out = nn.DenseGeneral(dim, axis=(-2, -1), dtype=self.dtype, kernel_init=_kernel_init,
                          bias_init=nn.initializers.zeros, name='out')(y)
    return out, weights


def reference_attention(q: Array, k: Array, v: Array):
  """Textbook attention, one softmax per head. Returns (output, weights).

  q, k, v: (batch, tokens, heads, head_dim); weights: (batch, heads, query, key).
  The softmax runs in float32 whatever the compute dtype.
  """
  scale = 1.0 / np.sqrt(q.shape[-1])
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) * scale
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v)
  return out, weights


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense -> dropout."""

  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    dim = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=_kernel_init, bias_init=_bias_init)(x)
    x = nn.gelu(x, approximate=False)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(dim, dtype=self.dtype, kernel_init=_kernel_init, bias_init=_bias_init)(x)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


def drop_path(module: nn.Module, x: Array, rate: float, train: bool) -> Array:
  """Stochastic depth: zero the residual branch of whole examples with prob `rate`."""
  if not train or rate == 0.0:
    return x
  keep = jax.random.bernoulli(module.make_rng('dropout'), 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Encoder1DBlock(nn.Module):
  """Pre-LayerNorm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: DType = jnp.float32
  attention: str = 'fused'

  @nn.compact
  def __call__(self, x: Array, *, train: bool, return_weights: bool = False):
    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_0')(x)
    y, weights = MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.attention_dropout_rate, dtype=self.dtype,
        implementation=self.attention, name='MultiHeadDotProductAttention_1')(
            y, train=train, return_weights=return_weights)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    x = x + drop_path(self, y, self.drop_path_rate, train)

    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_2')(x)
    y = MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, name='MlpBlock_3')(y, train=train)
    return x + drop_path(self, y, self.drop_path_rate, train), weights


class Encoder(nn.Module):
  """Position embeddings, `num_layers` blocks and the final LayerNorm."""

  num_layers: int
  mlp_dim: int
  num_heads: int
  posemb: str = 'learn'
  grid: tuple[int, int] = (14, 14)
  num_prefix_tokens: int = 1
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  dtype: DType = jnp.float32
  attention: str = 'fused'

  @nn.compact
  def __call__(self, x: Array, *, train: bool, return_weights: bool = False):
    if self.posemb == 'learn':
      x = AddPositionEmbs(name='posembed_input')(x)
    elif self.posemb == 'sincos2d':
      # Fixed embedding on the patch grid; prefix tokens (class token) get none.
      emb = sincos_2d_posemb(*self.grid, x.shape[-1])
      emb = np.pad(emb, ((0, 0), (self.num_prefix_tokens, 0), (0, 0)))
      x = x + jnp.asarray(emb, x.dtype)
    elif self.posemb != 'none':
      raise ValueError(f"Unknown posemb {self.posemb!r}; use 'learn', 'sincos2d' or 'none'.")
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)

    blocks, attention = [], []
    for i in range(self.num_layers):
      # Stochastic depth grows linearly with depth, from 0 to `stochastic_depth`.
      rate = self.stochastic_depth * i / max(self.num_layers - 1, 1)
      x, weights = Encoder1DBlock(
          mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.attention_dropout_rate, drop_path_rate=rate,
          dtype=self.dtype, attention=self.attention, name=f'encoderblock_{i}')(
              x, train=train, return_weights=return_weights)
      blocks.append(x)
      attention.append(weights)
    x = nn.LayerNorm(dtype=self.dtype, name='encoder_norm')(x)
    return x, {'blocks': blocks, 'attention': attention if return_weights else None}


class VisionTransformer(nn.Module):
  """ViT classifier. `__call__` returns `(logits, intermediates)`.

  images: (batch, height, width, channels) floats in the model's value range.
  intermediates: `pre_logits` (batch, dim), `encoded` (batch, tokens, dim),
  `blocks` (each block's output) and, with `return_attention=True`,
  `attention` (per block, (batch, heads, tokens, tokens)).
  """

  num_classes: int
  patch_size: int
  hidden_size: int
  num_layers: int
  mlp_dim: int
  num_heads: int
  pool: str = 'token'
  posemb: str = 'learn'
  representation_size: Optional[int] = None
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  dtype: DType = jnp.float32
  attention: str = 'fused'

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False, return_attention: bool = False):
    _, height, width, _ = images.shape
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f'Image size {height}x{width} is not divisible by the patch size {p}; '
                       'choose an image size that is a multiple of the patch size.')
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding='VALID',
                dtype=self.dtype, name='embedding')(images.astype(self.dtype))
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)  # (batch, patches, dim)

    if self.pool == 'token':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, d), jnp.float32)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (b, 1, 1)), x], axis=1)
    elif self.pool != 'gap':
      raise ValueError(f"Unknown pool {self.pool!r}; use 'token' or 'gap'.")
    num_prefix = 1 if self.pool == 'token' else 0

    x, out = Encoder(
        num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        posemb=self.posemb, grid=(gh, gw), num_prefix_tokens=num_prefix,
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        stochastic_depth=self.stochastic_depth, dtype=self.dtype, attention=self.attention,
        name='Transformer')(x, train=train, return_weights=return_attention)
    out['encoded'] = x
    x = x[:, 0] if self.pool == 'token' else x.mean(axis=1)  # (batch, dim)

    if self.representation_size is not None:
      x = nn.tanh(nn.Dense(self.representation_size, dtype=self.dtype, name='pre_logits')(x))
    out['pre_logits'] = x
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                      name='head')(x)
    return logits.astype(jnp.float32), out
