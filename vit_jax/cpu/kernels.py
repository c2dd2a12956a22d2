"""Products and backward passes written out for XLA:CPU: the same values, faster on CPU.

Speed code for one platform, kept apart from the model (vit_jax/models/,
plain JAX). The CPU train step opts in: vit_jax/training/platform.py gives
the model `projection_dot_general(...)` as its projections' `dot_general` and
`attention` as its attention function only when the step is traced for CPU
devices, so no GPU/TPU program holds them (tests/test_accelerators.py). Each
rule's values equal the plain computation's up to float rounding
(tests/test_autodiff.py). `projection_dot_general` with a backward rule and
`attention` are `jax.custom_vjp` functions: reverse mode only, so `jax.jvp`
of the CPU train step's model is unsupported (the plain model supports it).
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models.attention import head_major_attention

Array = jax.Array

# The name scope of every op these rules emit: it shows in profiles and in the
# lowered program's locations (what tests/test_accelerators.py looks for).
SCOPE = 'vit_jax_cpu_kernels'


@jax.named_scope(SCOPE)
def bfloat16_dot_general(lhs: Array, rhs: Array, dimension_numbers) -> Array:
  """`lax.dot_general` of bfloat16 operands, as XLA:CPU runs it in bfloat16: the same values.

  Asked for a bfloat16 result, XLA:CPU converts both operands to float32 and
  multiplies in float32. Asked for float32 (`preferred_element_type`), it keeps
  the operands in bfloat16 and hands a row-major product to YNNPACK's
  bfloat16 kernel (AVX512_BF16, or AMX where the CPU has it), which also
  accumulates in float32; the result is then rounded to bfloat16, as the
  float32 route rounds it. A product over a transposed operand is still
  converted (YNNPACK takes row-major operands only): the backward's products,
  and attention's, whose head-major operands are transposed views, stay in
  float32. So it pays off in forward passes on CPUs with AVX512_BF16: B/16
  inference at batch 8 runs 1.68x float32's speed, its train step 1.09x; on an
  AVX2 CPU without it YNNPACK's kernel is slower than the float32 route (B/16
  bfloat16 inference takes about 1.45x the CPU time), so the CPU step uses it
  only where `bfloat16_matmul_unit()` (docs/performance.md).
  """
  return jax.lax.dot_general(lhs, rhs, dimension_numbers,
                             preferred_element_type=jnp.float32).astype(lhs.dtype)


@jax.named_scope(SCOPE)
def attention_backward(residuals, d_out):
  """Gradients (d_q, d_k, d_v) of head-major attention from its residuals (q, k, v, weights, out).

  Operands are (batch, heads, tokens, head_dim). Autodiff's backward
  contracts two of its four products over the query axis of row-major
  operands (dK = dS^T Q, dV = P^T dO), which XLA:CPU hands to a slow Eigen
  path; this rule transposes dS and P once into fresh arrays (an
  optimisation barrier keeps XLA from folding the transposes back into the
  products), so every product is a plain matmul. The softmax's row sums come
  from dO . O (head_dim wide) instead of dP . P (tokens wide), as flash
  attention computes them. Ti/16 forward + backward: 1.03-1.04x (docs/performance.md).
  """
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


@jax.named_scope(SCOPE)
def dense_backward(lhs: Array, rhs: Array, g: Array, num_contract: int) -> tuple[Array, Array]:
  """Gradients (d_lhs, d_rhs) of a Dense/DenseGeneral product, with the weight gradient written for XLA:CPU.

  The product contracts the trailing `num_contract` axes of `lhs` with the
  leading ones of `rhs` (no batch axes), the contraction of flax's layers;
  `g` is the gradient of its output. Both gradients are 2-D products. The
  weight gradient contracts the row axis of x and g, so XLA:CPU copies one of
  them transposed first; it picks x even when x is the wider one (the MLP's
  second layer: [tokens, 3072] against [tokens, 768] in B/16). This rule
  transposes the narrower one instead; the barrier keeps XLA from folding the
  transpose back into the product. Ti/16 and B/16 forward + backward
  1.01-1.05x on CPU (docs/performance.md).
  """
  inner = int(np.prod(rhs.shape[:num_contract]))
  x, w = lhs.reshape(-1, inner), rhs.reshape(inner, -1)
  g2 = g.reshape(x.shape[0], w.shape[1])
  if x.shape[1] > g2.shape[1]:
    d_w = (jax.lax.optimization_barrier(g2.T) @ x).T
  else:
    d_w = jax.lax.optimization_barrier(x.T) @ g2
  return (g2 @ w.T).reshape(lhs.shape), d_w.reshape(rhs.shape)


def _contract(num_contract: int, lhs_ndim: int):
  """dimension_numbers of a flax Dense/DenseGeneral product: trailing axes of lhs with leading of rhs."""
  return ((tuple(range(lhs_ndim - num_contract, lhs_ndim)), tuple(range(num_contract))), ((), ()))


@functools.lru_cache(maxsize=None)
def bfloat16_matmul_unit(cpuinfo: str = '/proc/cpuinfo') -> bool:
  """Whether this host's CPU multiplies bfloat16 natively (AVX512_BF16 or AMX), which YNNPACK's
  bfloat16 kernel, and so `bfloat16_dot_general`, needs to pay off."""
  try:
    with open(cpuinfo) as f:
      flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
  except OSError:
    return False
  return 'avx512_bf16' in flags or 'amx_bf16' in flags


@functools.lru_cache(maxsize=None)
def projection_dot_general(backward: bool, bfloat16: bool) -> Callable:
  """A `lax.dot_general` for the model's projections with the chosen CPU rules: `dense_backward`
  as its backward (`backward`), `bfloat16_dot_general` for bfloat16 operands (`bfloat16`).

  Only flax's projection contraction (trailing axes of lhs with leading axes
  of rhs, no batch axes, default precision) takes the rules; anything else is
  `lax.dot_general`. Cached, so that equal choices give the same function
  (a model field: one compilation).
  """

  def forward(lhs, rhs, num_contract):
    numbers = _contract(num_contract, lhs.ndim)
    if bfloat16 and lhs.dtype == rhs.dtype == jnp.bfloat16:
      return bfloat16_dot_general(lhs, rhs, numbers)
    return jax.lax.dot_general(lhs, rhs, numbers)

  product = forward
  if backward:
    product = jax.custom_vjp(forward, nondiff_argnums=(2,))
    product.defvjp(lambda lhs, rhs, n: (forward(lhs, rhs, n), (lhs, rhs)),
                   lambda n, residuals, g: dense_backward(*residuals, g, num_contract=n))

  def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    n = len(lhs_contract)
    plain = (tuple(lhs_contract) == tuple(range(lhs.ndim - n, lhs.ndim))
             and tuple(rhs_contract) == tuple(range(n)) and not lhs_batch and not rhs_batch)
    if not plain or precision is not None or preferred_element_type is not None:
      return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                 preferred_element_type=preferred_element_type)
    return product(lhs, rhs, n)

  return dot_general


@jax.custom_vjp
def _head_major(q: Array, k: Array, v: Array) -> Array:
  return head_major_attention(q, k, v)[0]


def _head_major_fwd(q, k, v):
  out, weights = head_major_attention(q, k, v)
  return out, (q, k, v, weights, out)


_head_major.defvjp(_head_major_fwd, attention_backward)


def attention(q: Array, k: Array, v: Array) -> Array:
  """`vit_jax.models.attention.explicit_attention` with `attention_backward` as its backward:
  (batch, tokens, heads, head_dim) operands, the model's `attention_fn` in CPU train steps."""
  to_heads = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  (batch, heads, tokens, head_dim)
  return to_heads(_head_major(to_heads(q), to_heads(k), to_heads(v)))
