"""Building blocks of the ViT: attention (two paths), MLP, MAP head, LayerScale, drop path.

Parameter names follow the published checkpoints: attention projections are
`query`/`key`/`value`/`out`, MLPs `Dense_0`/`Dense_1`, the attention-pooling
head is big_vision's `MAPHead` (`probe`, `MultiHeadDotProductAttention_0`,
`LayerNorm_0`, `MlpBlock_0`), QK-normalisation uses flax's `query_ln`/`key_ln`.
"""

import functools
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
  docs/performance.md).
  """
  scale = 1.0 / np.sqrt(q.shape[-1])
  logits = jnp.einsum('bhqd,bhkd->bhqk', q, k).astype(jnp.float32) * scale
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum('bhqk,bhkd->bhqd', weights.astype(v.dtype), v)
  return out, weights


def head_major_attention_backward(residuals, d_out):
  """Gradients (d_q, d_k, d_v) of `head_major_attention`'s output from (q, k, v, weights, out).

  Autodiff's formula, with the softmax's row sums taken as dO . O (head_dim
  wide) rather than dP . P (tokens wide), as flash attention does.
  `kernels.attention_backward` is the same computation arranged for XLA:CPU.
  """
  q, k, v, weights, out = residuals
  scale = 1.0 / np.sqrt(q.shape[-1])
  d_weights = jnp.einsum('bhqd,bhkd->bhqk', d_out, v).astype(jnp.float32)
  row_sums = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
  d_logits = (weights * (d_weights - row_sums) * scale).astype(q.dtype)
  d_q = jnp.einsum('bhqk,bhkd->bhqd', d_logits, k)
  d_k = jnp.einsum('bhqk,bhqd->bhkd', d_logits, q)
  d_v = jnp.einsum('bhqk,bhqd->bhkd', weights.astype(v.dtype), d_out)
  return d_q, d_k, d_v


@jax.custom_vjp
def attention_output(q: Array, k: Array, v: Array) -> Array:
  """`head_major_attention`'s output, with its backward chosen per lowering platform.

  Forward: the same on every platform. Backward: `kernels.attention_backward`
  lowered for CPU, `head_major_attention_backward` elsewhere. Both branches
  take the same residuals, so the choice costs nothing (a VJP whose branches
  saved different residuals would carry all of them, zero-filled, through
  `nn.scan`).
  """
  return head_major_attention(q, k, v)[0]


def _attention_output_fwd(q, k, v):
  out, weights = head_major_attention(q, k, v)
  return out, (q, k, v, weights, out)


def _attention_output_bwd(residuals, d_out):
  return jax.lax.platform_dependent(residuals, d_out, cpu=kernels.attention_backward,
                                    default=head_major_attention_backward)


attention_output.defvjp(_attention_output_fwd, _attention_output_bwd)


def projection_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                           preferred_element_type=None) -> Array:
  """The `dot_general` of the encoder's projections (flax Dense/DenseGeneral `dot_general=`).

  `lax.dot_general`'s values on every platform. For the contraction those
  layers make (trailing axes of the inputs with leading axes of the kernel,
  no batch axes, default precision) the backward is chosen per lowering
  platform: `kernels.dense_backward` (a weight gradient written for XLA:CPU)
  on CPU, autodiff's products elsewhere. Anything else is `lax.dot_general`.
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  n = len(lhs_contract)
  plain = (tuple(lhs_contract) == tuple(range(lhs.ndim - n, lhs.ndim))
           and tuple(rhs_contract) == tuple(range(n)) and not lhs_batch and not rhs_batch)
  if not plain or precision is not None or preferred_element_type is not None:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  return _projection(lhs, rhs, n)


def _contract(num_contract: int, lhs_ndim: int):
  return ((tuple(range(lhs_ndim - num_contract, lhs_ndim)), tuple(range(num_contract))), ((), ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _projection(lhs: Array, rhs: Array, num_contract: int) -> Array:
  return jax.lax.dot_general(lhs, rhs, _contract(num_contract, lhs.ndim))


def _projection_fwd(lhs, rhs, num_contract):
  return _projection(lhs, rhs, num_contract), (lhs, rhs)


def _projection_bwd(num_contract, residuals, g):
  lhs, rhs = residuals

  def autodiff(lhs, rhs, g):
    return jax.vjp(lambda a, b: jax.lax.dot_general(a, b, _contract(num_contract, a.ndim)), lhs, rhs)[1](g)

  return jax.lax.platform_dependent(
      lhs, rhs, g, cpu=functools.partial(kernels.dense_backward, num_contract=num_contract),
      default=autodiff)


_projection.defvjp(_projection_fwd, _projection_bwd)


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


# Names of `config.model.attention`.
ATTENTION_IMPLEMENTATIONS = ('fused', 'xla', 'reference')


def cudnn_unsupported(dtype: DType, head_dim: int, queries: int, keys: int) -> Optional[str]:
  """Why cuDNN flash attention cannot take these operands, or None if it can.

  cuDNN's flash attention takes bfloat16 and float16 with head_dim a multiple
  of 8 up to 128 (256 on Hopper; 128 covers every ViT size). Cross-attention
  (the MAP head's single probe query) stays on XLA: negligible work, and a
  shape cuDNN is not tuned for.
  """
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f'cuDNN flash attention needs bfloat16 or float16 compute, not {jnp.dtype(dtype).name}'
  if head_dim % 8 or head_dim > 128:
    return f'cuDNN flash attention needs head_dim a multiple of 8 up to 128, not {head_dim}'
  if queries != keys:
    return 'cross-attention stays on XLA'
  return None


@functools.lru_cache(maxsize=None)
def cudnn_installed() -> bool:
  """Whether this JAX can call cuDNN (the CUDA plugin of `pip install -e .[cuda12]` is installed).

  Tracing `jax.nn.dot_product_attention(implementation='cudnn')` asks cuDNN
  for its version, so without the plugin (a CPU-only install) the cuDNN path
  cannot even be traced, for any platform.
  """
  try:
    from jax._src.lib import cuda_versions  # The plugin's version queries; None without it.
    return cuda_versions is not None and cuda_versions.cudnn_get_version() > 0
  except Exception:  # An older/newer JAX without this module, or cuDNN missing from the plugin.
    return False


def gpu_attention_implementation(implementation: str, dtype: DType, head_dim: int, queries: int,
                                 keys: int) -> tuple[str, str]:
  """(`jax.nn.dot_product_attention`'s implementation on GPU, why) for one attention layer.

  'cudnn' where `implementation` is 'fused', cuDNN is installed and supports
  the operands; else 'xla', with the reason.
  """
  if implementation != 'fused':
    return 'xla', f"config.model.attention={implementation!r}"
  reason = cudnn_unsupported(dtype, head_dim, queries, keys)
  if reason is None and not cudnn_installed():
    reason = 'cuDNN is not installed (pip install -e .[cuda12])'
  return ('xla', reason) if reason else ('cudnn', 'cuDNN flash attention')


def describe_attention(platform: str, implementation: str, dtype: DType, head_dim: int) -> str:
  """One line saying what computes the encoder's self-attention on `platform` ('cpu', 'gpu', 'tpu').

  What `MultiHeadDotProductAttention` lowers to there, for the startup log
  (`vit_jax.models.attention_implementation(config)` fills in the model).
  """
  if implementation == 'reference':
    return 'explicit softmax(q k^T / sqrt(d)) v, autodiff backward (attention=reference)'
  explicit = 'XLA: explicit softmax attention on head-major operands'
  if platform == 'cpu':
    return f'{explicit}, with the XLA:CPU backward of vit_jax/cpu/kernels.py'
  if platform in ('gpu', 'cuda'):
    choice, why = gpu_attention_implementation(implementation, dtype, head_dim, 1, 1)
    if choice == 'cudnn':
      return "cuDNN flash attention (jax.nn.dot_product_attention, implementation='cudnn')"
    return f'{explicit} (not cuDNN: {why})'
  return explicit


def use_fused_kernel(implementation: str, return_weights: bool, use_dropout: bool) -> bool:
  """Whether the attention goes through the per-platform path (`platform_attention`).

  Only for 'fused' and 'xla', without attention weights or attention dropout;
  otherwise the explicit `head_major_attention` runs on every platform.
  """
  return implementation in ('fused', 'xla') and not (return_weights or use_dropout)


def platform_attention(q: Array, k: Array, v: Array, implementation: str) -> Array:
  """Attention output for (batch, tokens, heads, head_dim) operands, chosen per lowering platform.

  Everywhere: the explicit softmax on head-major operands (`attention_output`;
  XLA's own `dot_product_attention` is slower on CPU and the same einsums
  elsewhere), whose backward is the XLA:CPU rule of vit_jax/cpu/kernels.py
  on CPU. On GPU (CUDA), when `gpu_attention_implementation` chooses it
  (bfloat16 / float16 self-attention, cuDNN installed, 'fused'): cuDNN's
  flash attention through `jax.nn.dot_product_attention`. Every branch
  computes the same function. That choice is made while tracing, because
  the cuDNN path can only be traced where cuDNN is installed; there, the
  non-CUDA branch's residuals ride along zero-filled through `nn.scan`
  (unused, but memory) unless the blocks are rematerialised.
  """
  _, queries, _, head_dim = q.shape
  gpu_choice, _ = gpu_attention_implementation(implementation, q.dtype, head_dim, queries, k.shape[1])

  def explicit(q, k, v):
    to_heads = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  (batch, heads, tokens, head_dim)
    return to_heads(attention_output(to_heads(q), to_heads(k), to_heads(v)))

  if gpu_choice != 'cudnn':
    return explicit(q, k, v)

  def cudnn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation='cudnn')

  return jax.lax.platform_dependent(q, k, v, cuda=cudnn, default=explicit)


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head attention with the published parameter layout.

  `query`/`key`/`value` kernels are (dim, heads, head_dim) and `out` is
  (heads, head_dim, dim). The implementations compute the same function:
  `fused` (the default, `platform_attention`) is cuDNN's flash attention on
  GPU where cuDNN is installed and supports the dtype and shapes (bfloat16 /
  float16 self-attention; `cudnn_unsupported`), and everywhere else the
  explicit softmax on head-major operands (`attention_output`), whose
  backward is written for XLA:CPU when lowered for CPU; `xla` is the same but
  never cuDNN; `reference` is `head_major_attention` with plain autodiff on
  every platform, and is what runs whenever the attention weights are asked
  for or attention dropout is active in training. With `qk_norm`,
  q and k are layer-normalised per head before the dot product (ViT-22B).
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
        bias_init=nn.initializers.zeros, dot_general=projection_dot_general, name=name)
    q, k, v = dense('query')(x), dense('key')(kv), dense('value')(kv)  # (batch, tokens, heads, head_dim)
    if self.qk_norm:
      q = nn.LayerNorm(use_bias=False, dtype=self.dtype, name='query_ln')(q)
      k = nn.LayerNorm(use_bias=False, dtype=self.dtype, name='key_ln')(k)
    if self.implementation not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"Unknown attention implementation {self.implementation!r}; "
                       f"use one of {', '.join(ATTENTION_IMPLEMENTATIONS)}.")

    use_dropout = train and self.dropout_rate > 0
    weights = None
    if use_fused_kernel(self.implementation, return_weights, use_dropout):
      y = platform_attention(q, k, v, self.implementation)
    else:
      to_heads = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  (batch, heads, tokens, head_dim)
      q, k, v = to_heads(q), to_heads(k), to_heads(v)
      y, weights = head_major_attention(q, k, v)
      if use_dropout:
        keep = jax.random.bernoulli(self.make_rng('dropout'), 1 - self.dropout_rate, weights.shape)
        dropped = jnp.where(keep, weights / (1 - self.dropout_rate), 0).astype(v.dtype)
        y = jnp.einsum('bhqk,bhkd->bhqd', dropped, v)
      y = to_heads(y)  # (batch, tokens, heads, head_dim) again, as `out` expects.
    out = nn.DenseGeneral(dim, axis=(-2, -1), dtype=self.dtype, kernel_init=kernel_init,
                          bias_init=nn.initializers.zeros, dot_general=projection_dot_general,
                          name='out')(y)
    return out, weights


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense -> dropout. `gelu` names the GELU (`GELUS`)."""

  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  gelu: str = 'tanh'

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    activation = gelu_function(self.gelu)
    dim = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=kernel_init, bias_init=bias_init,
                 dot_general=projection_dot_general)(x)
    x = activation(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(dim, dtype=self.dtype, kernel_init=kernel_init, bias_init=bias_init,
                 dot_general=projection_dot_general)(x)
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
  gelu: str = 'tanh'

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
    x = x + MlpBlock(self.mlp_dim, dtype=self.dtype, gelu=self.gelu, name='MlpBlock_0')(y, train=train)
    return x[:, 0], weights
