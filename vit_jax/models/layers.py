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


@jax.custom_vjp
def attention_output(q: Array, k: Array, v: Array) -> Array:
  """The output of `head_major_attention`, with a backward pass written out for XLA:CPU.

  Same operands and value; the gradients equal autodiff's up to float
  rounding. Autodiff's backward contracts two of its four products over the
  query axis of row-major operands (dK = dS^T Q, dV = P^T dO), which
  XLA:CPU hands to a slow Eigen path; here dS and P are transposed once
  into fresh arrays (an optimisation barrier keeps XLA from folding the
  transposes back into the products), so every product is a plain matmul.
  The softmax's row sums come from dO . O (head_dim wide) instead of
  dP . P (tokens wide), as flash attention computes them. Ti/16 forward +
  backward: 1.03-1.04x (README, Performance).
  """
  return head_major_attention(q, k, v)[0]


def _attention_output_fwd(q, k, v):
  out, weights = head_major_attention(q, k, v)
  return out, (q, k, v, weights, out)


def _attention_output_bwd(residuals, d_out):
  q, k, v, weights, out = residuals
  scale = 1.0 / np.sqrt(q.shape[-1])
  d_weights = jnp.einsum('bhqd,bhkd->bhqk', d_out, v).astype(jnp.float32)
  row_sums = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
  d_logits = (weights * (d_weights - row_sums) * scale).astype(q.dtype)  # Includes the 1/sqrt(d).
  d_logits_t, weights_t = jax.lax.optimization_barrier(
      (jnp.swapaxes(d_logits, 2, 3), jnp.swapaxes(weights.astype(v.dtype), 2, 3)))
  d_q = jnp.einsum('bhqk,bhkd->bhqd', d_logits, k)
  d_k = jnp.einsum('bhkq,bhqd->bhkd', d_logits_t, q)
  d_v = jnp.einsum('bhkq,bhqd->bhkd', weights_t, d_out)
  return d_q, d_k, d_v


attention_output.defvjp(_attention_output_fwd, _attention_output_bwd)


@jax.custom_vjp
def _matmul(x: Array, w: Array) -> Array:
  return x @ w


def _matmul_fwd(x, w):
  return x @ w, (x, w)


def _matmul_bwd(residuals, g):
  x, w = residuals
  # The weight gradient contracts the row axis of x and g, so XLA:CPU copies one of them
  # transposed first; it picks x even when x is the wider one (the MLP's second layer:
  # [tokens, 3072] against [tokens, 768] in B/16). Transpose the narrower one instead; the
  # barrier keeps XLA from folding the transpose back into the product.
  if x.shape[1] > g.shape[1]:
    d_w = (jax.lax.optimization_barrier(g.T) @ x).T
  else:
    d_w = jax.lax.optimization_barrier(x.T) @ g
  return g @ w.T, d_w


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                      preferred_element_type=None) -> Array:
  """`lax.dot_general` for flax's Dense/DenseGeneral, with the weight gradient written for XLA:CPU.

  Takes the contraction those layers make (trailing axes of the inputs with
  leading axes of the kernel, no batch axes) as one 2-D product through
  `_matmul`; anything else, or a `precision` / `preferred_element_type`, goes
  to `lax.dot_general` unchanged. Same values and gradients up to float
  rounding; Ti/16 and B/16 forward + backward 1.01-1.05x on CPU (README, Performance).
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  n = len(lhs_contract)
  plain = (tuple(lhs_contract) == tuple(range(lhs.ndim - n, lhs.ndim))
           and tuple(rhs_contract) == tuple(range(n)) and not lhs_batch and not rhs_batch)
  if not plain or precision is not None or preferred_element_type is not None:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  inner = int(np.prod(rhs.shape[:n]))
  out = _matmul(lhs.reshape(-1, inner), rhs.reshape(inner, -1))
  return out.reshape(lhs.shape[:lhs.ndim - n] + rhs.shape[n:])


def projection_dot_general():
  """The `dot_general` of the encoder's projections: `dense_dot_general` on CPU, flax's default elsewhere."""
  return dense_dot_general if jax.default_backend() == 'cpu' else None


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
