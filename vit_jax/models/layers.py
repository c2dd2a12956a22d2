"""Building blocks of the ViT: attention module, MLP, MAP head, LayerScale, drop path, GELU, posemb.

Parameter names follow the published checkpoints: attention projections are
`query`/`key`/`value`/`out`, MLPs `Dense_0`/`Dense_1`, the attention-pooling
head is big_vision's `MAPHead` (`probe`, `MultiHeadDotProductAttention_0`,
`LayerNorm_0`, `MlpBlock_0`), QK-normalisation uses flax's `query_ln`/`key_ln`.
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import attention as attention_ops
from vit_jax.models import rope as rope_lib

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



# GELU's tanh constants: sqrt(2 / pi) and the cubic term's coefficient.
_SQRT_2_OVER_PI = np.sqrt(2.0 / np.pi)
_CUBIC = 0.044715


@jax.custom_jvp
def gelu_tanh(x: Array) -> Array:
  """GELU's tanh approximation, as flax's `nn.gelu` (approximate=True) and the published ViTs.

  0.5 x (1 + tanh(z)) with z = sqrt(2/pi) (x + 0.044715 x^3), written as the
  identical x * sigmoid(2 z), with its derivative written out so that the
  backward keeps one array (the derivative) per activation instead of
  autodiff's several. On XLA:CPU (2 cores, noisy) it runs forward + backward
  at least as fast as the erf form (B/16's MLP on 788 tokens: median 363 ms
  against 372 ms, `jax.nn.gelu`'s tanh form 370 ms), and a Ti/16 train step
  under `nn.scan` (batch 8) needs 366 MiB of temporaries against 477 MiB
  with erf and 533 MiB with autodiff of this form. Within 1e-6 of
  `jax.nn.gelu(x, approximate=True)` in float32 (gradient within 4e-6).
  """
  return x * _gelu_sigmoid(x)


def _gelu_sigmoid(x: Array) -> Array:
  """sigmoid(2 z) of `gelu_tanh`."""
  c = np.asarray(2 * _SQRT_2_OVER_PI, x.dtype)
  c3 = np.asarray(2 * _SQRT_2_OVER_PI * _CUBIC, x.dtype)
  return jax.nn.sigmoid(x * (c + c3 * (x * x)))


@gelu_tanh.defjvp
def _gelu_tanh_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  s = _gelu_sigmoid(x)
  c = np.asarray(2 * _SQRT_2_OVER_PI, x.dtype)
  c3 = np.asarray(6 * _SQRT_2_OVER_PI * _CUBIC, x.dtype)
  # d/dx [x s(2z)] = s + x s (1 - s) d(2z)/dx, with d(2z)/dx = 2 sqrt(2/pi) (1 + 3 * 0.044715 x^2).
  derivative = s + x * s * (1 - s) * (c + c3 * (x * x))
  return x * s, derivative * dx


def gelu_exact(x: Array) -> Array:
  """Exact GELU, x * Phi(x), written with erf as torch and timm write it.

  `jax.nn.gelu(approximate=False)` uses erfc, which XLA:CPU evaluates at about
  half the speed; the two differ by under 1e-6 in float32.
  """
  return 0.5 * x * (1 + jax.lax.erf(x * np.asarray(1 / np.sqrt(2), x.dtype)))


# Names of `config.model.gelu`. The published ViT checkpoints (original release,
# AugReg, big_vision) were trained with 'tanh'; timm and PyTorch use 'exact'.
# The two differ by up to 5e-4 per activation.
GELUS = {'tanh': gelu_tanh, 'exact': gelu_exact}


def gelu_function(name: str):
  """The GELU of `config.model.gelu`. Raises ValueError listing the names for anything else."""
  if name not in GELUS:
    raise ValueError(f'Unknown gelu {name!r}; use one of {", ".join(GELUS)}.')
  return GELUS[name]


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head attention with the published parameter layout.

  `query`/`key`/`value` kernels are (dim, heads, head_dim) and `out` is
  (heads, head_dim, dim). The output is `attention_fn(q, k, v)` on
  (batch, tokens, heads, head_dim) operands: by default
  `attention.explicit_attention` (plain XLA ops); the training side may give
  cuDNN's flash attention or the CPU train step's rule
  (vit_jax/training/platform.py). Whenever the attention weights are asked
  for, or attention dropout is active in training, the explicit softmax runs
  whatever `attention_fn` is. `dot_general` computes the four projections
  (None: `lax.dot_general`). With `qk_norm`, q and k are layer-normalised per
  head before the dot product (ViT-22B). With `rope` ('rope_axial' or
  'rope_mixed', vit_jax/models/rope.py) q and k are then rotated by the tokens'
  `positions`; with `lengths` (batch,) only the first lengths[i] keys count
  (NaFlex padding), and `attention_fn` is given them as `lengths=`.
  """

  num_heads: int
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  qk_norm: bool = False
  dot_general: Optional[Callable] = None
  attention_fn: Optional[Callable] = None
  rope: str = ''  # '' (none), 'rope_axial' or 'rope_mixed'.

  @nn.compact
  def __call__(self, x: Array, kv: Optional[Array] = None, *, train: bool,
               return_weights: bool = False, positions: Optional[Array] = None,
               lengths: Optional[Array] = None):
    """Self-attention over `x`, or cross-attention from `x` to `kv`. Returns (out, weights)."""
    kv = x if kv is None else kv
    dim = kv.shape[-1]
    if dim % self.num_heads:
      raise ValueError(f'hidden_size {dim} is not divisible by num_heads {self.num_heads}.')
    head_dim = dim // self.num_heads
    dense = lambda name: nn.DenseGeneral(  # noqa: E731
        (self.num_heads, head_dim), dtype=self.dtype, kernel_init=kernel_init,
        bias_init=nn.initializers.zeros, dot_general=self.dot_general, name=name)
    q, k, v = dense('query')(x), dense('key')(kv), dense('value')(kv)  # (batch, tokens, heads, head_dim)
    if self.qk_norm:
      q = nn.LayerNorm(use_bias=False, dtype=self.dtype, name='query_ln')(q)
      k = nn.LayerNorm(use_bias=False, dtype=self.dtype, name='key_ln')(k)
    if self.rope:
      q, k = rope_lib.Rotary(self.rope, name='rope')(q, k, positions)
    masking = {} if lengths is None else {'lengths': lengths}
    use_dropout = train and self.dropout_rate > 0
    weights = None
    if not (return_weights or use_dropout):
      y = (self.attention_fn or attention_ops.explicit_attention)(q, k, v, **masking)
    else:
      to_heads = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  (batch, heads, tokens, head_dim)
      q, k, v = to_heads(q), to_heads(k), to_heads(v)
      y, weights = attention_ops.head_major_attention(q, k, v, lengths)
      if use_dropout:
        keep = jax.random.bernoulli(self.make_rng('dropout'), 1 - self.dropout_rate, weights.shape)
        dropped = jnp.where(keep, weights / (1 - self.dropout_rate), 0).astype(v.dtype)
        y = jnp.einsum('bhqk,bhkd->bhqd', dropped, v)
      y = to_heads(y)  # (batch, tokens, heads, head_dim) again, as `out` expects.
    out = nn.DenseGeneral(dim, axis=(-2, -1), dtype=self.dtype, kernel_init=kernel_init,
                          bias_init=nn.initializers.zeros, dot_general=self.dot_general,
                          name='out')(y)
    return out, weights


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense -> dropout. `gelu` names the GELU (`GELUS`)."""

  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  gelu: str = 'tanh'
  dot_general: Optional[Callable] = None  # None: lax.dot_general.

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    activation = gelu_function(self.gelu)
    dim = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=kernel_init, bias_init=bias_init,
                 dot_general=self.dot_general)(x)
    x = activation(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(dim, dtype=self.dtype, kernel_init=kernel_init, bias_init=bias_init,
                 dot_general=self.dot_general)(x)
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
  gelu: str = 'tanh'
  dot_general: Optional[Callable] = None  # Of the projections; None: lax.dot_general.

  @nn.compact
  def __call__(self, x: Array, *, train: bool, return_weights: bool = False,
               lengths: Optional[Array] = None):
    b, _, d = x.shape
    probe = self.param('probe', nn.initializers.xavier_uniform(), (1, 1, d), jnp.float32)
    probe = jnp.tile(probe.astype(x.dtype), (b, 1, 1))
    x, weights = MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, dot_general=self.dot_general,
        name='MultiHeadDotProductAttention_0')(
            probe, x, train=train, return_weights=return_weights, lengths=lengths)  # (batch, 1, dim)
    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_0')(x)
    x = x + MlpBlock(self.mlp_dim, dtype=self.dtype, gelu=self.gelu, dot_general=self.dot_general,
                     name='MlpBlock_0')(y, train=train)
    return x[:, 0], weights
