"""Token dropping (PatchDropout, Liu et al. 2022): train on a random subset of each image's patches.

In training, after the position embeddings are added, each image keeps
`kept_patches(n, rate)` of its n patch tokens, drawn at random per image and
left in their row-major order; the tokens in front of the patches (the class
token) are always kept, and registers, which the encoder inserts afterwards,
are never dropped. The encoder then runs on the shorter sequence, so a step
costs less. Evaluation keeps every token.
"""

import jax
import jax.numpy as jnp


def kept_patches(num_patches: int, rate: float) -> int:
  """How many of `num_patches` patch tokens an image keeps at drop `rate`: (1 - rate) n rounded, at least 1."""
  return max(1, round(num_patches * (1.0 - rate)))


def drop_patches(rng: jax.Array, x: jax.Array, num_prefix: int, rate: float) -> jax.Array:
  """(batch, num_prefix + n, dim) tokens -> (batch, num_prefix + kept_patches(n, rate), dim).

  The first `num_prefix` tokens are kept as they are; of the patch tokens
  after them, each image keeps its own random subset, in their original order.
  """
  batch, tokens, _ = x.shape
  num_patches = tokens - num_prefix
  keep = kept_patches(num_patches, rate)
  # A random permutation per image (argsort of uniform noise), its first `keep` indices in order.
  chosen = jnp.sort(jnp.argsort(jax.random.uniform(rng, (batch, num_patches)), axis=1)[:, :keep], axis=1)
  kept = jnp.take_along_axis(x[:, num_prefix:], chosen[:, :, None], axis=1)  # (batch, keep, dim)
  return jnp.concatenate([x[:, :num_prefix], kept], axis=1)
