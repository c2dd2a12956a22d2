"""Products and backward passes written out for XLA:CPU: the same values, faster on CPU.

These are speed code for one platform, kept apart from the model's math
(vit_jax/models/attention.py and layers.py). The model calls them in the CPU
branch of `lax.platform_dependent`, so only a program lowered for CPU holds
them (tests/test_accelerators.py checks a GPU/TPU export has none of this
file's code). Each rule's values equal the plain computation's up to float
rounding (tests/test_models.py).
"""

import jax
import jax.numpy as jnp
import numpy as np

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
  float32. So it pays off in forward passes: B/16 inference at batch 8 runs
  1.68x float32's speed, its train step 1.09x (docs/performance.md).
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
