"""Model sizes of the ViT family, in one table, and `create_model`.

A variant is written `SIZE/PATCH`, e.g. "B/16": the size row below with a
patch size of 16 pixels. Sizes are those of Table 1 of Dosovitskiy et al.
(Ti and S from DeiT / "How to train your ViT"; g and G from Table 2 of
"Scaling Vision Transformers", Zhai et al. 2021), plus `tiny` for tests.

Hybrids (Section 3.1 of the paper) are named as the original release names
them, `R50+B/16`: a ResNet-v2 (`vit_jax.models.resnet`) whose feature map the
ViT of that size cuts into patches; see `HYBRIDS`.
"""

from typing import Any

from vit_jax.config.sizes import image_hw
from vit_jax.models import flexi
from vit_jax.models.rope import POSEMBS, split_posemb
from vit_jax.models.vit import VisionTransformer, remat_policy

# size: (hidden_size, num_layers, mlp_dim, num_heads)
SIZES: dict[str, tuple[int, int, int, int]] = {
    'tiny': (32, 2, 64, 2),  # For tests: compiles in a second.
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
    'H': (1280, 32, 5120, 16),
    'g': (1408, 40, 6144, 16),
    'G': (1664, 48, 8192, 16),
}


# Hybrids, as in the release's configs: name -> (size, units per ResNet stage,
# patch size on the ResNet's feature map, root width). The root alone has
# stride 4 and every stage after the first halves the resolution, so R26 (4
# stages) and R50+L (3, 4, 6, 3) have stride 32 and R50+B's three stages (3, 4,
# 9) stride 16; their patches are 1x1. R+Ti/16 cuts the root's /4 map into
# 8x8 patches: stride 32, a 7x7 grid at 224 px, whatever its name says.
HYBRIDS: dict[str, tuple[str, tuple[int, ...], int, int]] = {
    'Rtiny+tiny/8': ('tiny', (1, 1), 1, 32),  # For tests: two one-unit stages, stride 8.
    'R+Ti/16': ('Ti', (), 8, 64),
    'R26+S/32': ('S', (2, 2, 2, 2), 1, 64),
    'R26+B/32': ('B', (2, 2, 2, 2), 1, 64),
    'R50+B/16': ('B', (3, 4, 9), 1, 64),
    'R50+L/32': ('L', (3, 4, 6, 3), 1, 64),
}


def parse_variant(variant: str) -> dict[str, Any]:
  """'B/16' -> dict(hidden_size=768, num_layers=12, mlp_dim=3072, num_heads=12, patch_size=16).

  Hybrids (`HYBRIDS`) add `resnet_stages` and `resnet_width`, and their
  `patch_size` is on the ResNet's feature map (1 for 'R50+B/16').
  """
  if variant in HYBRIDS:
    size, stages, patch, width = HYBRIDS[variant]
    return {**parse_variant(f'{size}/{patch}'), 'resnet_stages': stages, 'resnet_width': width}
  size, sep, patch = variant.partition('/')
  if not sep or size not in SIZES or not patch.isdigit() or int(patch) < 1:
    raise ValueError(f'Unknown model variant {variant!r}: write SIZE/PATCH with SIZE one of '
                     f'{", ".join(SIZES)} and PATCH a positive integer, e.g. "B/16", or a hybrid, '
                     f'one of {", ".join(HYBRIDS)}.')
  hidden_size, num_layers, mlp_dim, num_heads = SIZES[size]
  return dict(hidden_size=hidden_size, num_layers=num_layers, mlp_dim=mlp_dim,
              num_heads=num_heads, patch_size=int(patch))


def create_model(variant: str, num_classes: int, **options: Any) -> VisionTransformer:
  """Returns the Flax ViT for `variant` (e.g. "B/16") with a `num_classes` head.

  `options` are `VisionTransformer` fields (pool, posemb, dropout_rate, dtype,
  ...); `hidden_size`, `num_layers`, `mlp_dim`, `num_heads` given there (and not
  None) override the variant's, which is how depth/width ablations are written.
  """
  fields = parse_variant(variant)
  for key, value in options.items():
    if value is not None or key not in fields:
      fields[key] = value
  return VisionTransformer(num_classes=num_classes, **fields)


def model_from_config(config) -> VisionTransformer:
  """The model that `config.model` and `config.dataset.num_classes` describe.

  Checks the image size against the patch size first, so that a bad pair fails
  with a clear message before anything is compiled.
  """
  import jax.numpy as jnp  # Local: keeps this table importable without touching devices.
  from vit_jax.errors import UsageError

  m = config.model
  try:
    fields = parse_variant(m.variant)
  except ValueError as e:
    raise UsageError(f'config.model.variant: {e}') from None
  try:
    height, width = image_hw(config.input.image_size)
  except ValueError as e:
    raise UsageError(f'config.input.image_size: {e}') from None
  # Pixels per token: the patch size, times the ResNet's stride for a hybrid.
  cell = VisionTransformer(num_classes=1, **fields).pixels_per_token
  if height % cell or width % cell:
    what = (f'the patch size {cell}' if cell == fields['patch_size'] else f'the {cell} pixels per '
            f'patch (ResNet stride {cell // fields["patch_size"]} x patch size {fields["patch_size"]})')
    raise UsageError(f'config.input.image_size={config.input.image_size} is not divisible by {what} '
                     f'of {m.variant!r} on each side ({height}x{width}); use a height and width '
                     f'that are multiples of {cell}.')
  if m.dtype not in ('float32', 'bfloat16', 'float16'):
    raise UsageError(f"config.model.dtype={m.dtype!r}; use 'float32', 'bfloat16' or 'float16'.")
  checks = {'pool': ('token', 'gap', 'map'), 'posemb': POSEMBS,
            'attention': ('fused', 'xla', 'reference'), 'gelu': ('tanh', 'exact')}
  for key, valid in checks.items():
    if m[key] not in valid:
      raise UsageError(f'config.model.{key}={m[key]!r}; use one of {", ".join(valid)}.')
  try:
    remat_policy(m.remat)
  except ValueError as e:
    raise UsageError(f'config.model.remat: {e}') from None
  if m.num_registers < 0:
    raise UsageError(f'config.model.num_registers={m.num_registers} is negative; use 0 or more.')
  if not 0.0 <= m.patch_dropout < 1.0:
    raise UsageError(f'config.model.patch_dropout={m.patch_dropout} must be in [0, 1), e.g. 0.5; 0 disables.')
  try:
    flexi.check_patch_sizes(m.patch_sizes, (height, width), 'resnet_stages' in fields)
  except ValueError as e:
    raise UsageError(f'config.model.{e}') from None
  model = create_model(
      m.variant, config.dataset.num_classes, hidden_size=m.hidden_size, num_layers=m.num_layers,
      mlp_dim=m.mlp_dim, num_heads=m.num_heads, pool=m.pool, posemb=m.posemb,
      representation_size=m.representation_size, dropout_rate=m.dropout_rate,
      attention_dropout_rate=m.attention_dropout_rate, stochastic_depth=m.stochastic_depth,
      dtype=jnp.dtype(m.dtype), num_registers=m.num_registers,
      qk_norm=m.qk_norm, layerscale=m.layerscale, remat=m.remat, scan=m.scan, gelu=m.gelu,
      patch_dropout=m.patch_dropout)
  if model.hidden_size % model.num_heads:
    raise UsageError(f'hidden_size {model.hidden_size} is not divisible by num_heads '
                     f'{model.num_heads}; change config.model.hidden_size or num_heads.')
  return naflex_options(model, config)


def naflex_options(model: VisionTransformer, config):
  """`model` checked for its RoPE and NaFlex keys (config.model.posemb, config.input.max_tokens), with
  the learned position table's grid set for NaFlex batches (`VisionTransformer.posemb_grid`)."""
  from vit_jax.errors import UsageError

  head_dim = model.hidden_size // model.num_heads
  if split_posemb(model.posemb)[1] and head_dim % 4:
    raise UsageError(f'config.model.posemb={model.posemb!r} rotates pairs on two axes, so the head size '
                     f'(hidden_size / num_heads = {head_dim}) must be a multiple of 4; change '
                     'config.model.hidden_size or num_heads.')
  max_tokens = config.input.max_tokens
  if model.patch_dropout and (split_posemb(model.posemb)[1] or max_tokens):
    raise UsageError(f'config.model.patch_dropout={model.patch_dropout} does not combine with RoPE '
                     f'(config.model.posemb={model.posemb!r}) or NaFlex (config.input.max_tokens={max_tokens}) '
                     'yet: the dropped tokens would leave their positions and lengths behind; set one of them off.')
  if max_tokens and config.model.get('patch_sizes'):
    raise UsageError(f'config.model.patch_sizes={tuple(config.model.patch_sizes)} (FlexiViT) does not combine '
                     f'with config.input.max_tokens={max_tokens} (NaFlex) yet; set one of them off.')
  if not max_tokens:
    return model
  if max_tokens < 0:
    raise UsageError(f'config.input.max_tokens={max_tokens} is negative; use a patch budget such as 256, '
                     'or 0 for fixed-size images.')
  if model.resnet_stages is not None:
    raise UsageError(f'config.input.max_tokens={max_tokens} (NaFlex) needs a plain ViT, not the hybrid '
                     f'{config.model.variant!r}: its ResNet sees whole images; use 0.')
  return model.clone(posemb_grid=model.token_grid(*image_hw(config.input.image_size)))

