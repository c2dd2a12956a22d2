"""`python -m vit_jax.tools.summary VARIANT [--num_classes N] [--image_size S] [--pool P]`.

Prints the parameters of every module of a ViT variant, their total, and the
forward-pass GFLOPs per image at the given resolution, then `total_params: N`
as the last line. Nothing is allocated: shapes come from `jax.eval_shape`, and
FLOPs from XLA's cost analysis of the lowered (not compiled) forward pass at
batch 1, which counts 2 FLOPs per multiply-add plus the element-wise work
(softmax, GELU, LayerNorm).
"""

import argparse
import math
import re
import sys
from typing import Any, Optional

import jax
import jax.numpy as jnp

from vit_jax.models import create_model

from vit_jax.errors import ArgumentParser


# Top-level modules, and those inside `Transformer`, in the order the forward pass uses them.
FORWARD_ORDER = ['embedding', 'cls', 'registers', 'posembed_input', 'encoderblock', 'encoder_norm',
                 'Transformer', 'MAPHead_0', 'pre_logits', 'head']


def count_by_module(params: dict) -> list[tuple[str, int, int]]:
  """(module, repeats, parameters per repeat) rows; encoder blocks collapse into one row."""
  rows: list[tuple[str, int, int]] = []

  def size(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))

  def forward_order(name: str) -> int:  # Unknown names go last.
    return FORWARD_ORDER.index(name) if name in FORWARD_ORDER else len(FORWARD_ORDER)
  for name in sorted(params, key=forward_order):
    value = params[name]
    if name != 'Transformer':
      rows.append((name, 1, size(value)))
      continue
    blocks = sorted((k for k in value if re.fullmatch(r'encoderblock_\d+', k)), key=lambda k: int(k[13:]))
    for child in sorted(value, key=lambda k: forward_order(re.sub(r'_\d+$', '', k))):
      sub = value[child]
      if child == 'encoderblock':  # Scanned: one stacked block.
        depth = jax.tree.leaves(sub)[0].shape[0]
        rows.append((f'Transformer/encoderblock_{{0..{depth - 1}}}', depth, size(sub) // depth))
      elif child not in blocks:
        rows.append((f'Transformer/{child}', 1, size(sub)))
      elif child == blocks[0]:
        rows.append((f'Transformer/encoderblock_{{0..{len(blocks) - 1}}}', len(blocks), size(sub)))
  return rows


def flops_per_image(model, image_size: int) -> float:
  """Forward FLOPs of one image, from XLA's cost analysis of the lowered program."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(images.shape)))['params']
  lowered = jax.jit(lambda p, x: model.apply({'params': p}, x)[0]).lower(params, images)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def summarize(variant: str, num_classes: int = 1000, image_size: int = 224, **options: Any) -> str:
  """The summary text of `variant`; its last line is `total_params: N`."""
  model = create_model(variant, num_classes, **options)
  if image_size % model.patch_size:
    raise ValueError(f'--image_size {image_size} is not divisible by the patch size '
                     f'{model.patch_size} of {variant}; use a multiple of {model.patch_size}.')
  images = jnp.zeros((1, image_size, image_size, 3))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), images))['params']
  rows = count_by_module(params)
  total = sum(repeats * count for _, repeats, count in rows)
  grid = image_size // model.patch_size
  tokens = grid * grid + model.num_prefix_tokens
  lines = [f'ViT-{variant}: hidden {model.hidden_size}, {model.num_layers} layers, MLP {model.mlp_dim}, '
           f'{model.num_heads} heads, pool {model.pool!r}, {num_classes} classes, '
           f'{image_size}x{image_size} px = {grid}x{grid} patches, {tokens} tokens',
           f'{"module":<38} {"parameters":>28}']
  for name, repeats, count in rows:
    value = f'{repeats} x {count:,} = {repeats * count:,}' if repeats > 1 else f'{count:,}'
    lines.append(f'{name:<38} {value:>28}')
  gflops = flops_per_image(model, image_size) / 1e9
  lines += [f'{"total":<38} {total:>28,}',
            f'GFLOPs per image: {gflops:.4g} (XLA cost analysis of the lowered forward pass, '
            'batch 1; a multiply-add is 2 FLOPs)',
            f'total_params: {total}']
  return '\n'.join(lines)


def main(argv: Optional[list[str]] = None) -> int:
  parser = ArgumentParser(prog='vit-jax summary', description=__doc__.split('\n\n')[1])
  parser.add_argument('variant', help='SIZE/PATCH, e.g. B/16, g/14, tiny/4')
  parser.add_argument('--num_classes', type=int, default=1000, help='classifier head size (default 1000)')
  parser.add_argument('--image_size', type=int, default=224, help='square input side in pixels (default 224)')
  parser.add_argument('--pool', default='token', choices=('token', 'gap', 'map'),
                      help='pooling (default token)')
  args = parser.parse_args(argv)
  try:
    print(summarize(args.variant, args.num_classes, args.image_size, pool=args.pool), flush=True)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0
