"""vit_jax: Vision Transformers in JAX/Flax, from a laptop CPU to multi-host pods."""
