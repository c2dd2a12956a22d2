"""Building blocks of the ViT: attention (two paths), MLP, MAP head, LayerScale, drop path.

Parameter names follow the published checkpoints: attention projections are
`query`/`key`/`value`/`out`, MLPs `Dense_0`/`Dense_1`, the attention-pooling
head is big_vision's `MAPHead` (`probe`, `MultiHeadDotProductAttention_0`,
`LayerNorm_0`, `MlpBlock_0`), QK-normalisation uses flax's `query_ln`/`key_ln`.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.cpu import kernels

Array = jax.Array
DType = Any

# Initialisers of the original release: Xavier-uniform kernels and tiny normal
# biases in the encoder, zero head (so a fresh head starts at uniform logits).
kernel_init = nn.initializers.xavier_uniform()
bias_init = nn.initializers.normal(stddev=1e-6)


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


def reference_attention(q: Array, k: Array, v: Array):
  """Textbook attention, one softmax per head. Returns (output, weights).

  q: (batch, queries, heads, head_dim); k, v: (batch, keys, heads, head_dim);
  weights: (batch, heads, queries, keys). The softmax runs in float32 whatever
  the compute dtype.
  """
  to_heads = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  (batch, heads, tokens, head_dim)
  out, weights = head_major_attention(to_heads(q), to_heads(k), to_heads(v))
  return to_heads(out), weights


def head_major_attention(q: Array, k: Array, v: Array):
  """`reference_attention` on (batch, heads, tokens, head_dim) operands. Returns (output, weights).

  With heads next to batch, both products are batched matmuls over
  contiguous (tokens, head_dim) slices, and the softmax reduces the last,
  contiguous axis; XLA:CPU runs this 1.3-1.6x faster than the
  (batch, tokens, heads, head_dim) form (forward and backward; see the
  README's Performance section).
  """
  scale = 1.0 / np.sqrt(q.shape[-1])
  logits = jnp.einsum('bhqd,bhkd->bhqk', q, k).astype(jnp.float32) * scale
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum('bhqk,bhkd->bhqd', weights.astype(v.dtype), v)
  return out, weights


# On CPU, 'fused' attention is `head_major_attention` with a backward pass written for XLA:CPU.
attention_output = kernels.with_cpu_attention_backward(head_major_attention)


def projection_dot_general():
  """The `dot_general` of the encoder's projections: `dense_dot_general` on CPU, flax's default elsewhere."""
  return kernels.dense_dot_general if jax.default_backend() == 'cpu' else None


def gelu(x: Array) -> Array:
  """Exact GELU, x * Phi(x), written with erf as torch and timm write it.

  `jax.nn.gelu(approximate=False)` uses erfc, which XLA:CPU evaluates at about
  half the speed; the two differ by under 1e-6 in float32.
  """
  return 0.5 * x * (1 + jax.lax.erf(x * np.asarray(1 / np.sqrt(2), x.dtype)))


def use_fused_kernel(implementation: str, return_weights: bool, use_dropout: bool) -> bool:
  """Whether `jax.nn.dot_product_attention` computes the attention.

  Only for 'fused' without weights or attention dropout, and only on an
  accelerator, where it lowers to a fused kernel (cuDNN's on GPU). On CPU
  there is no fused kernel, and its XLA fallback is slower than
  `head_major_attention`, the same function.
  """
  return (implementation == 'fused' and not (return_weights or use_dropout)
          and jax.default_backend() != 'cpu')


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head attention with the published parameter layout.

  `query`/`key`/`value` kernels are (dim, heads, head_dim) and `out` is
  (heads, head_dim, dim). Two paths compute the same function:
  `fused` calls `jax.nn.dot_product_attention` (cuDNN's fused kernel on GPU)
  on accelerators; `reference` computes each head's softmax(q k^T / sqrt(d)) v
  explicitly (`head_major_attention`) and can return the attention weights.
  The explicit path also runs for `fused` when weights are asked for, when
  attention dropout is active in training, and on CPU (see `use_fused_kernel`;
  there `fused` takes `attention_output`, the same function with a backward
  written for XLA:CPU, and `reference` plain autodiff). With `qk_norm`, q and
  k are layer-normalised per head before the dot product (ViT-22B).
  """

  num_heads: int
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  implementation: str = 'fused'
  qk_norm: bool = False

  @nn.compact
  def __call__(self, x: Array, kv: Optional[Array] = None, *, train: bool,
               return_weights: bool = False):
    """Self-attention over `x`, or cross-attention from `x` to `kv`. Returns (out, weights)."""
    kv = x if kv is None else kv
    dim = kv.shape[-1]
    if dim % self.num_heads:
      raise ValueError(f'hidden_size {dim} is not divisible by num_heads {self.num_heads}.')
    head_dim = dim // self.num_heads
    dense = lambda name: nn.DenseGeneral(  # noqa: E731
        (self.num_heads, head_dim), dtype=self.dtype, kernel_init=kernel_init,
        bias_init=nn.initializers.zeros, dot_general=projection_dot_general(), name=name)
    q, k, v = dense('query')(x), dense('key')(kv), dense('value')(kv)  # (batch, tokens, heads, head_dim)
    if self.qk_norm:
      q = nn.LayerNorm(use_bias=False, dtype=self.dtype, name='query_ln')(q)
      k = nn.LayerNorm(use_bias=False, dtype=self.dtype, name='key_ln')(k)
    if self.implementation not in ('fused', 'reference'):
      raise ValueError(f"Unknown attention implementation {self.implementation!r}; "
                       "use 'fused' or 'reference'.")

    use_dropout = train and self.dropout_rate > 0
    weights = None
    if use_fused_kernel(self.implementation, return_weights, use_dropout):
      y = jax.nn.dot_product_attention(q, k, v)
    else:
      to_heads = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  (batch, heads, tokens, head_dim)
      q, k, v = to_heads(q), to_heads(k), to_heads(v)
      if self.implementation == 'fused' and not (return_weights or use_dropout):
        y = attention_output(q, k, v)  # On CPU: the same values, a faster backward.
      else:
        y, weights = head_major_attention(q, k, v)
      if use_dropout:
        keep = jax.random.bernoulli(self.make_rng('dropout'), 1 - self.dropout_rate, weights.shape)
        dropped = jnp.where(keep, weights / (1 - self.dropout_rate), 0).astype(v.dtype)
        y = jnp.einsum('bhqk,bhkd->bhqd', dropped, v)
      y = to_heads(y)  # (batch, tokens, heads, head_dim) again, as `out` expects.
    out = nn.DenseGeneral(dim, axis=(-2, -1), dtype=self.dtype, kernel_init=kernel_init,
                          bias_init=nn.initializers.zeros, dot_general=projection_dot_general(),
                          name='out')(y)
    return out, weights


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense -> dropout."""

  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    dim = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=kernel_init, bias_init=bias_init,
                 dot_general=projection_dot_general())(x)
    x = gelu(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(dim, dtype=self.dtype, kernel_init=kernel_init, bias_init=bias_init,
                 dot_general=projection_dot_general())(x)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


class LayerScale(nn.Module):
  """Per-channel learned scale of a residual branch (CaiT, DeiT III): `scale` (dim,)."""

  init_value: float

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param('scale', nn.initializers.constant(self.init_value), (x.shape[-1],), jnp.float32)
    return x * scale.astype(x.dtype)


def drop_path(module: nn.Module, x: Array, rate, train: bool) -> Array:
  """Stochastic depth: zero the residual branch of whole examples with prob `rate`.

  `rate` may be a traced scalar (one per layer under `nn.scan`).
  """
  if not train:
    return x
  keep = jax.random.bernoulli(module.make_rng('dropout'), 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class MAPHead(nn.Module):
  """Multihead attention pooling (Scaling ViT; big_vision's `MAPHead` layout).

  A learned `probe` query attends over all tokens; the result goes through a
  residual MLP. Returns (pooled (batch, dim), weights (batch, heads, 1, tokens)
  or None).
  """

  num_heads: int
  mlp_dim: int
  dtype: DType = jnp.float32
  attention: str = 'fused'

  @nn.compact
  def __call__(self, x: Array, *, train: bool, return_weights: bool = False):
    b, _, d = x.shape
    probe = self.param('probe', nn.initializers.xavier_uniform(), (1, 1, d), jnp.float32)
    probe = jnp.tile(probe.astype(x.dtype), (b, 1, 1))
    x, weights = MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, implementation=self.attention,
        name='MultiHeadDotProductAttention_0')(
            probe, x, train=train, return_weights=return_weights)  # (batch, 1, dim)
    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_0')(x)
    x = x + MlpBlock(self.mlp_dim, dtype=self.dtype, name='MlpBlock_0')(y, train=train)
    return x[:, 0], weights
