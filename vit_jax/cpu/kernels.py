"""Backward passes written out for XLA:CPU: the same values and gradients, faster on CPU.

These are speed code for one platform, kept apart from the model's math
(vit_jax/models/layers.py), which calls them only when lowering for CPU.
Each rule's gradients equal autodiff's up to float rounding (tests/test_models.py).
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def with_cpu_attention_backward(forward: Callable) -> Callable:
  """`forward(q, k, v) -> (out, weights)` as `f(q, k, v) -> out` with `attention_backward` as its VJP.

  Operands are (batch, heads, tokens, head_dim). Autodiff's backward
  contracts two of its four products over the query axis of row-major
  operands (dK = dS^T Q, dV = P^T dO), which XLA:CPU hands to a slow Eigen
  path; `attention_backward` transposes dS and P once into fresh arrays (an
  optimisation barrier keeps XLA from folding the transposes back into the
  products), so every product is a plain matmul. The softmax's row sums come
  from dO . O (head_dim wide) instead of dP . P (tokens wide), as flash
  attention computes them. Ti/16 forward + backward: 1.03-1.04x (docs/performance.md).
  """

  @jax.custom_vjp
  def attention_output(q: Array, k: Array, v: Array) -> Array:
    return forward(q, k, v)[0]

  def attention_output_fwd(q, k, v):
    out, weights = forward(q, k, v)
    return out, (q, k, v, weights, out)

  attention_output.defvjp(attention_output_fwd, attention_backward)
  return attention_output


def attention_backward(residuals, d_out):
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
  rounding; Ti/16 and B/16 forward + backward 1.01-1.05x on CPU (docs/performance.md).
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
