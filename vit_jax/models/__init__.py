"""Flax ViT modules and the variant table."""

from vit_jax.models.variants import HYBRIDS, SIZES, create_model, model_from_config, parse_variant
from vit_jax.models.vit import VisionTransformer

__all__ = ["HYBRIDS", "SIZES", "VisionTransformer", "create_model", "model_from_config", "parse_variant"]
