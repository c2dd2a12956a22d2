"""Flax ViT modules and the variant table."""

from vit_jax.models.variants import SIZES, create_model, model_from_config, parse_variant
from vit_jax.models.vit import VisionTransformer

__all__ = ["SIZES", "VisionTransformer", "create_model", "model_from_config", "parse_variant"]
