"""A trained run (ours or a published checkpoint) at another patch size: `at_patch_size(run, N)`.

The parameters go through the FlexiViT resize of vit_jax/models/flexi.py,
the one a `config.model.patch_sizes` run trains through: the patch
embedding is PI-resized to N x N and learned position embeddings are resized
to the new patch grid; everything else is shared. The run's config then
names the variant at patch size N (`Ti/4` -> `Ti/8`), so what `evaluate
--patch_size N` evaluates and `export --patch_size N` writes is an ordinary
model at that patch size. Loading a checkpoint into a model of another patch
size (`config.init.path`, `--checkpoint` with a config) PI-resizes the
embedding in the same way (`vit_jax.checkpoint.npz.adapt_params`).
"""

import dataclasses
from typing import Optional

import jax
import numpy as np

from vit_jax.config.sizes import image_hw
from vit_jax.errors import UsageError
from vit_jax.checkpoint.run import Run
from vit_jax.models import flexi


def at_patch_size(run: Run, patch_size: Optional[int]) -> Run:
  """`run` with its model and parameters at `patch_size` (the run itself for None or its own size).

  Raises UsageError for a hybrid, or a patch size that does not divide the
  run's image size.
  """
  from vit_jax.models import HYBRIDS, model_from_config

  if patch_size is None or patch_size == run.model.patch_size:
    return run
  config = run.config.copy_and_resolve_references()
  variant = config.model.variant
  if variant in HYBRIDS or run.model.resnet_stages is not None:
    raise UsageError(f'--patch_size={patch_size}: {variant!r} is a hybrid, whose patches are cells of the '
                     'ResNet feature map; a patch size can only be changed for a plain ViT.')
  if patch_size < 1:
    raise UsageError(f'--patch_size={patch_size} must be a positive integer, e.g. 16.')
  config.model.variant = f'{variant.partition("/")[0]}/{patch_size}'
  height, width = image_hw(config.input.image_size)
  if height % patch_size or width % patch_size:
    raise UsageError(f'--patch_size={patch_size} does not divide the run\'s {height}x{width} images '
                     '(config.input.image_size); use a patch size that divides both sides.')
  model = model_from_config(config)
  params = flexi.resize_params(jax.tree.map(np.asarray, jax.device_get(run.params)), patch_size, (height, width))
  params = jax.device_put(params, jax.local_devices()[0])
  return dataclasses.replace(run, config=config, model=model, params=params)
