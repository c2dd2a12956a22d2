"""FlexiViT training (`config.model.patch_sizes`): one patch size per step, drawn from the step.

The parameters stay at the variant's patch size. Each step draws one of
`config.model.patch_sizes` uniformly, from the step's random key (a function
of `config.seed` and the step only, so a resumed run draws the same sizes),
and computes the loss of the model at that patch size on the parameters
PI-resized to it (vit_jax/models/flexi.py); the gradient flows back through
the resize to the shared parameters. The choice is a `lax.switch` over one
branch per patch size inside the one compiled train step: each branch has
its own token count, and on GPU its own attention (`platform_model`).
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from vit_jax.models.vit import VisionTransformer
from vit_jax.training import platform as platform_lib

# Folded into the step's key for the draw, so that it is independent of the dropout masks.
_PATCH_SIZE_STREAM = 0x464C4558  # 'FLEX'


def patch_models(model: VisionTransformer, config: ml_collections.ConfigDict,
                 platform: str) -> tuple[VisionTransformer, ...]:
  """The model at each of `config.model.patch_sizes`, with what `platform` computes it with; () when off."""
  return tuple(platform_lib.platform_model(model.clone(patch_size=p), config, platform)[0]
               for p in config.model.patch_sizes)


def patch_size_index(rng: jax.Array, count: int) -> jax.Array:
  """The index of this step's patch size among `count`, from the step's key `rng`."""
  return jax.random.randint(jax.random.fold_in(rng, _PATCH_SIZE_STREAM), (), 0, count)


def switch(index: jax.Array, branches: Sequence[Callable]) -> Callable:
  """A function that runs `branches[index]` on its arguments (one compiled program for all)."""
  return lambda *args: jax.lax.switch(index, list(branches), *args)


def patch_size_metric(index: jax.Array, models: Sequence[VisionTransformer]) -> jax.Array:
  """The patch size this step trained at, for the step's metrics (`train/patch_size`)."""
  return jnp.asarray([m.patch_size for m in models], jnp.float32)[index]
