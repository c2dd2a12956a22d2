"""cuDNN's flash attention in the encoder's attention signature.

The model (vit_jax/models/) computes plain XLA attention unless it is given
another function of the same signature; `vit_jax.training.platform` gives it
`cudnn_attention`, at the padded length a trial lowering finds JAX's cuDNN
path takes, when the step is traced for CUDA devices.
"""

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def cudnn_attention(q: Array, k: Array, v: Array, *, length: Optional[int] = None,
                    lengths: Optional[Array] = None) -> Array:
  """cuDNN flash attention for (batch, tokens, heads, head_dim) self-attention operands.

  With `length` above the token count, the sequence is zero-padded to it and
  the padding masked (`query_seq_lengths` / `key_value_seq_lengths`): JAX's
  cuDNN path refuses some lengths in training (odd ones: the 197 tokens of a
  ViT with a class token), and masked padding computes the same function.
  `lengths` (batch,): real tokens per sequence (NaFlex padding), masked the same way.
  Only traceable where JAX's CUDA plugin is installed.
  """
  tokens = q.shape[1]
  if lengths is None and (length is None or length == tokens):
    return jax.nn.dot_product_attention(q, k, v, implementation='cudnn')
  length = max(length or tokens, tokens)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, length - tokens), (0, 0), (0, 0)))  # noqa: E731
  lengths = jnp.full((q.shape[0],), tokens, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
  out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths, implementation='cudnn')
  return out[:, :tokens]
