"""tfds builders shipped with vit_jax (prepared offline, no download)."""
