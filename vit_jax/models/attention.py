"""Attention: the softmax computation, its backward per platform, and which implementation runs where.

`attention_output` is the explicit softmax attention on head-major operands
whose backward is `vit_jax.cpu.kernels.attention_backward` in CPU lowerings
and autodiff's elsewhere; `platform_attention` picks cuDNN's flash kernel in
CUDA lowerings where it takes the operands, else XLA. The Flax module that
uses them is `vit_jax.models.layers.MultiHeadDotProductAttention`.
"""

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.cpu import kernels

Array = jax.Array
DType = Any


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
