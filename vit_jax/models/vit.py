"""The Vision Transformer of Dosovitskiy et al. (2020) in Flax linen.

Parameter names follow the published ViT checkpoints (`embedding`, `cls`,
`Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}/...`,
`Transformer/encoder_norm`, `pre_logits`, `head`) so that `.npz` files of the
original release load without a renaming table. Additions use the names of the
codebases that introduced them: `MAPHead_0` (big_vision), `registers`,
`query_ln`/`key_ln` (flax's QK-normalisation), `layerscale_*/scale`.

With `scan=True` the blocks are one `nn.scan` and their parameters are stacked
under `Transformer/encoderblock` with a leading layer axis (big_vision's scan
layout); `stack_blocks` / `unstack_blocks` convert between the two layouts, and
the checkpoint code always reads and writes the per-block one.
"""

from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import naflex, rope
from vit_jax.models.attention import reference_attention
from vit_jax.models.layers import (AddPositionEmbs, LayerScale, MAPHead, MlpBlock,
                                   MultiHeadDotProductAttention, drop_path, sincos_2d_posemb)
from vit_jax.models.resnet import resnet_features, resnet_stride
from vit_jax.models.token_dropping import drop_patches

__all__ = ['REMAT_POLICIES', 'Encoder', 'Encoder1DBlock', 'VisionTransformer', 'reference_attention',
           'remat_policy', 'sincos_2d_posemb', 'stack_blocks', 'unstack_blocks']

Array = jax.Array
DType = Any
POOLS = ('token', 'gap', 'map')

# Names of `config.model.remat` -> what the backward pass may keep of each
# block's forward pass (a `jax.checkpoint` policy); the rest is recomputed.
# 'full' keeps only the block's input (None: jax.checkpoint's default).
# Saving the matmul outputs ('dots_...') recomputes only the cheap
# element-wise work; 'dots_with_no_batch_dims_saveable' keeps the projections
# and MLP products but recomputes attention's batched (batch, heads) products.
REMAT_POLICIES: dict[str, Optional[Callable]] = {
    'full': None,
    'nothing_saveable': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(remat: Union[bool, str]) -> tuple[bool, Optional[Callable]]:
  """(whether blocks are rematerialised, their `jax.checkpoint` policy) for `config.model.remat`.

  `False`/'none': no rematerialisation; `True`/'full': recompute everything;
  other names: `REMAT_POLICIES`. Raises ValueError for anything else.
  """
  if remat is False or remat == 'none':
    return False, None
  if remat is True:
    return True, None
  if isinstance(remat, str) and remat in REMAT_POLICIES:
    return True, REMAT_POLICIES[remat]
  raise ValueError(f'Unknown remat policy {remat!r}; use False, True or one of '
                   f'{", ".join(["none", *REMAT_POLICIES])}.')


class Encoder1DBlock(nn.Module):
  """Pre-LayerNorm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)).

  `__call__(x, drop_path_rate, train, return_weights)` returns `(x, out)` with
  `out = {'block': x, 'attention': weights or None}`: the `(carry, per-layer
  output)` form that `nn.scan` needs, so the same block runs looped or scanned.
  Arguments are positional so that `nn.remat` can mark the flags static.
  """

  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  use_drop_path: bool = False  # Static: whether the (possibly traced) drop-path rate applies.
  dtype: DType = jnp.float32
  qk_norm: bool = False
  layerscale: Optional[float] = None
  gelu: str = 'tanh'  # 'tanh' (the published models) or 'exact' (timm): see layers.GELUS.
  dot_general: Optional[Callable] = None  # Of the projections; None: lax.dot_general.
  attention_fn: Optional[Callable] = None  # Self-attention; None: attention.explicit_attention.
  rope: str = ''  # 2-D RoPE of q and k ('rope_axial', 'rope_mixed'; vit_jax/models/rope.py) or ''.

  @nn.compact
  def __call__(self, x: Array, drop_path_rate=0.0, train: bool = False, return_weights: bool = False,
               positions: Optional[Array] = None, lengths: Optional[Array] = None):
    def residual(branch, name):
      if self.layerscale is not None:
        branch = LayerScale(self.layerscale, name=f'layerscale_{name}')(branch)
      if self.use_drop_path:
        branch = drop_path(self, branch, drop_path_rate, train)
      return branch

    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_0')(x)
    y, weights = MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.attention_dropout_rate, dtype=self.dtype,
        qk_norm=self.qk_norm, dot_general=self.dot_general, attention_fn=self.attention_fn,
        rope=self.rope, name='MultiHeadDotProductAttention_1')(
            y, train=train, return_weights=return_weights, positions=positions, lengths=lengths)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    x = x + residual(y, 'attention')

    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_2')(x)
    y = MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, self.gelu, self.dot_general,
                 name='MlpBlock_3')(y, train=train)
    x = x + residual(y, 'mlp')
    return x, {'block': x, 'attention': weights}


class Encoder(nn.Module):
  """Position embeddings, register tokens, `num_layers` blocks and the final LayerNorm."""

  num_layers: int
  mlp_dim: int
  num_heads: int
  posemb: str = 'learn'
  grid: tuple[int, int] = (14, 14)
  num_prefix_tokens: int = 1  # Class token(s) in front of the patches; they get position embeddings.
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  dtype: DType = jnp.float32
  qk_norm: bool = False
  layerscale: Optional[float] = None
  remat: Union[bool, str] = False  # See `remat_policy`.
  scan: bool = False
  gelu: str = 'tanh'
  dot_general: Optional[Callable] = None
  attention_fn: Optional[Callable] = None
  patch_dropout: float = 0.0  # Share of patch tokens dropped in training (token_dropping.py).

  @nn.compact
  def __call__(self, x: Array, registers: Optional[Array] = None, *, train: bool,
               return_weights: bool = False, patch_grids: Optional[Array] = None):
    """`patch_grids` (batch, 2): a NaFlex batch's (rows, columns) per image (vit_jax/models/naflex.py);
    None: every image on `grid`."""
    absolute, rotary = rope.split_posemb(self.posemb)
    if patch_grids is not None and absolute != 'none':
      x = naflex.NaFlexPositionEmbs(absolute, self.grid, self.num_prefix_tokens, name='posembed_input')(
          x, patch_grids)
    elif absolute == 'learn':
      x = AddPositionEmbs(name='posembed_input')(x)
    elif absolute == 'sincos2d':
      # Fixed embedding on the patch grid; prefix tokens (class token) get none.
      emb = sincos_2d_posemb(*self.grid, x.shape[-1])
      emb = np.pad(emb, ((0, 0), (self.num_prefix_tokens, 0), (0, 0)))
      x = x + jnp.asarray(emb, x.dtype)
    if self.patch_dropout > 0 and (rotary or patch_grids is not None):
      # Dropped tokens would leave RoPE's positions and NaFlex's lengths behind.
      raise ValueError(f'model.patch_dropout={self.patch_dropout} does not combine with RoPE '
                       f'(posemb {self.posemb!r}) or NaFlex inputs (input.max_tokens) yet; '
                       'set model.patch_dropout=0 or use a learned/sincos2d posemb on square inputs.')
    if train and self.patch_dropout > 0:  # After the positions are added; registers come after.
      x = drop_patches(self.make_rng('dropout'), x, self.num_prefix_tokens, self.patch_dropout)
    if registers is not None:
      # Registers (Darcet et al. 2023) go after the class token and carry no
      # position, so the published posemb shape is unchanged.
      n = self.num_prefix_tokens
      x = jnp.concatenate([x[:, :n], registers.astype(x.dtype), x[:, n:]], axis=1)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    num_prefix = self.num_prefix_tokens + (0 if registers is None else registers.shape[1])
    positions = lengths = None
    if patch_grids is not None:
      lengths = num_prefix + naflex.patch_counts(patch_grids)
    if rotary:
      positions = (rope.static_positions(self.grid, num_prefix) if patch_grids is None else
                   rope.token_positions(naflex.patch_positions(patch_grids, x.shape[1] - num_prefix), num_prefix))

    block = Encoder1DBlock
    rematerialise, policy = remat_policy(self.remat)
    if rematerialise:
      # 0 = self, 1 = x, 2 = drop_path_rate, 3 = train, 4 = return_weights.
      block = nn.remat(block, prevent_cse=not self.scan, static_argnums=(3, 4), policy=policy)
    options = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
                   attention_dropout_rate=self.attention_dropout_rate,
                   use_drop_path=self.stochastic_depth > 0, dtype=self.dtype,
                   qk_norm=self.qk_norm, layerscale=self.layerscale, gelu=self.gelu,
                   dot_general=self.dot_general, attention_fn=self.attention_fn, rope=rotary)
    # Stochastic depth grows linearly with depth, from 0 to `stochastic_depth`.
    rates = [self.stochastic_depth * i / max(self.num_layers - 1, 1) for i in range(self.num_layers)]
    if self.scan:
      scanned = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                        length=self.num_layers)
      x, out = scanned(name='encoderblock', **options)(
          x, jnp.asarray(rates, jnp.float32), train, return_weights, positions, lengths)
      blocks = [out['block'][i] for i in range(self.num_layers)]
      attention = [out['attention'][i] for i in range(self.num_layers)] if return_weights else None
    else:
      blocks, attention = [], []
      for i in range(self.num_layers):
        x, out = block(name=f'encoderblock_{i}', **options)(x, rates[i], train, return_weights,
                                                             positions, lengths)
        blocks.append(out['block'])
        attention.append(out['attention'])
    x = nn.LayerNorm(dtype=self.dtype, name='encoder_norm')(x)
    return x, {'blocks': blocks, 'attention': attention if return_weights else None}


class VisionTransformer(nn.Module):
  """ViT classifier. `__call__` returns `(logits, intermediates)`.

  images: (batch, height, width, channels) floats in the model's value range.
  intermediates: `pre_logits` (batch, dim), `encoded` (batch, tokens, dim),
  `blocks` (each block's output) and, with `return_attention=True`,
  `attention` (per block, (batch, heads, tokens, tokens)) and, for
  `pool='map'`, `map_attention` (batch, heads, 1, tokens), the probe's
  attention over the encoded tokens. Tokens are ordered
  [class token (pool 'token'), registers, patches in row-major order];
  `num_prefix_tokens` says how many come before the patches.

  With `resnet_stages` set, a hybrid (Section 3.1 of the paper): the images go
  through the ResNet of `vit_jax.models.resnet` first and `embedding` cuts its
  feature map into `patch_size` patches; `token_grid` gives the patch grid.
  """

  num_classes: int
  patch_size: int
  hidden_size: int
  num_layers: int
  mlp_dim: int
  num_heads: int
  pool: str = 'token'  # 'token' (class token), 'gap' (mean of patch tokens) or 'map' (attention pooling).
  posemb: str = 'learn'
  representation_size: Optional[int] = None
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  dtype: DType = jnp.float32
  num_registers: int = 0
  qk_norm: bool = False
  layerscale: Optional[float] = None  # Initial LayerScale value; None: no LayerScale.
  remat: Union[bool, str] = False  # False, True or a policy name: see `remat_policy`.
  scan: bool = False
  gelu: str = 'tanh'  # 'tanh' (flax nn.gelu, as the published checkpoints) or 'exact' (erf, as timm).
  # Hybrids: units per ResNet stage (() = the root alone); None: a plain ViT.
  # `patch_size` is then in pixels of the ResNet's feature map.
  resnet_stages: Optional[tuple[int, ...]] = None
  resnet_width: int = 64  # Root channels (64 x the release's width factor).
  # What computes the encoder's and MAP head's projections (a `lax.dot_general`
  # signature) and the encoder's self-attention (`attention.explicit_attention`'s
  # signature). None: plain `lax.dot_general` and the explicit softmax, so a
  # model from `create_model` is plain JAX (jax.grad, jax.jvp). The training side
  # sets them for the platform a step is traced for (vit_jax/training/platform.py).
  dot_general: Optional[Callable] = None
  attention_fn: Optional[Callable] = None
  # Token dropping (vit_jax/models/token_dropping.py): the share of patch tokens each training
  # image drops, at random; never the class token or registers, none at evaluation.
  patch_dropout: float = 0.0
  # NaFlex batches (vit_jax/models/naflex.py): the (rows, columns) grid of the learned position
  # table, resized to each image's grid; None: the grid of the images the model was built with.
  posemb_grid: Optional[tuple[int, int]] = None

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens in front of the patch tokens: the class token (pool 'token') and the registers."""
    return int(self.pool == 'token') + self.num_registers

  @property
  def pixels_per_token(self) -> int:
    """Side in input pixels of one token's cell: the patch size times the ResNet's stride."""
    if self.resnet_stages is None:
      return self.patch_size
    return self.patch_size * resnet_stride(len(self.resnet_stages))

  def token_grid(self, height: int, width: int) -> tuple[int, int]:
    """(rows, columns) of patch tokens for (height, width) images; raises ValueError if a side
    is not a multiple of `pixels_per_token`."""
    p = self.pixels_per_token
    if height % p or width % p:
      what = (f'the patch size {p}' if self.resnet_stages is None else
              f'{p} (the ResNet stride {p // self.patch_size} x the patch size {self.patch_size})')
      raise ValueError(f'Image size {height}x{width} is not divisible by {what}; '
                       f'choose a height and width that are multiples of {p}.')
    return height // p, width // p

  @nn.compact
  def __call__(self, images: Union[Array, dict], *, train: bool = False, return_attention: bool = False):
    p = self.patch_size
    if self.pool not in POOLS:
      raise ValueError(f"Unknown pool {self.pool!r}; use one of {', '.join(POOLS)}.")
    patch_grids = counts = None
    if naflex.is_naflex(images):  # Patches of images at their own aspect ratio, padded.
      if self.resnet_stages is not None:
        raise ValueError('NaFlex batches need a plain ViT: a hybrid\'s ResNet sees whole images.')
      if self.posemb_grid is None and rope.split_posemb(self.posemb)[0] == 'learn':
        raise ValueError('A NaFlex batch with learned position embeddings needs posemb_grid, the '
                         "grid of the model's table, e.g. (14, 14) for 224 px and patch 16.")
      patch_grids = images['grid']
      counts = naflex.patch_counts(patch_grids)
      x = naflex.embed_patches(images['patches'], p, self.hidden_size, self.dtype)
      (b, _, d), (gh, gw) = x.shape, self.posemb_grid or (1, 1)
    else:
      _, height, width, _ = images.shape
      self.token_grid(height, width)  # Checks the size.
      x = images.astype(self.dtype)
      if self.resnet_stages is not None:
        # Hybrid: the patches are cells of the ResNet's feature map.
        x = resnet_features(x, self.resnet_stages, self.resnet_width, self.dtype)
      x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding='VALID',
                  dtype=self.dtype, name='embedding')(x)
      b, gh, gw, d = x.shape
      x = x.reshape(b, gh * gw, d)  # (batch, patches, dim)

    num_cls = int(self.pool == 'token')
    if num_cls:
      cls = self.param('cls', nn.initializers.zeros, (1, 1, d), jnp.float32)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (b, 1, 1)), x], axis=1)
    registers = None
    if self.num_registers:
      registers = self.param('registers', nn.initializers.normal(stddev=0.02),
                             (1, self.num_registers, d), jnp.float32)
      registers = jnp.tile(registers, (b, 1, 1))

    x, out = Encoder(
        num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        posemb=self.posemb, grid=(gh, gw), num_prefix_tokens=num_cls,
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        stochastic_depth=self.stochastic_depth, dtype=self.dtype, qk_norm=self.qk_norm,
        layerscale=self.layerscale, remat=self.remat, scan=self.scan, gelu=self.gelu,
        dot_general=self.dot_general, attention_fn=self.attention_fn, patch_dropout=self.patch_dropout,
        name='Transformer')(x, registers, train=train, return_weights=return_attention, patch_grids=patch_grids)
    out['encoded'] = x  # (batch, tokens, dim)

    if self.pool == 'token':
      x = x[:, 0]
    elif self.pool == 'gap' and counts is not None:
      x = naflex.masked_mean(x[:, self.num_prefix_tokens:], counts)  # The real patches only.
    elif self.pool == 'gap':
      x = x[:, self.num_prefix_tokens:].mean(axis=1)  # Patches only: registers are not pooled.
    else:
      lengths = None if counts is None else counts + self.num_prefix_tokens
      x, weights = MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype,
                           gelu=self.gelu, dot_general=self.dot_general, name='MAPHead_0')(
                               x, train=train, return_weights=return_attention, lengths=lengths)
      if return_attention:
        out['map_attention'] = weights

    if self.representation_size is not None:
      x = nn.tanh(nn.Dense(self.representation_size, dtype=self.dtype, name='pre_logits')(x))
    out['pre_logits'] = x  # (batch, dim)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                      name='head')(x)
    return logits.astype(jnp.float32), out


def unstack_blocks(params: dict) -> dict:
  """Scan layout -> per-block layout: `Transformer/encoderblock` (leading layer axis)
  becomes `Transformer/encoderblock_{i}`. Other layouts are returned unchanged."""
  transformer = params.get('Transformer', {})
  if 'encoderblock' not in transformer:
    return params
  stacked = transformer['encoderblock']
  depth = jax.tree.leaves(stacked)[0].shape[0]
  new = {k: v for k, v in transformer.items() if k != 'encoderblock'}
  def take(x, i):  # Shapes (jax.eval_shape templates) are split too.
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x[i]
  for i in range(depth):
    new[f'encoderblock_{i}'] = jax.tree.map(lambda x, i=i: take(x, i), stacked)
  return {**params, 'Transformer': new}


def stack_blocks(params: dict) -> dict:
  """Per-block layout -> scan layout (the inverse of `unstack_blocks`)."""
  transformer = params.get('Transformer', {})
  names = [k for k in transformer if k.startswith('encoderblock_')]
  if not names:
    return params
  depth = len(names)
  blocks = [transformer[f'encoderblock_{i}'] for i in range(depth)]
  new = {k: v for k, v in transformer.items() if not k.startswith('encoderblock_')}
  new['encoderblock'] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *blocks)
  return {**params, 'Transformer': new}
