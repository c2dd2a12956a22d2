"""`vit-jax summary VARIANT [--num_classes N] [--image_size S|H,W] [--pool P]`.

Prints the parameters of every module of a ViT variant (hybrids such as
R50+B/16 included: their ResNet root and stages come first), their total, and the
forward-pass GFLOPs per image at the given resolution, then `total_params: N`
as the last line. Nothing is allocated: shapes come from `jax.eval_shape`, and
FLOPs from XLA's cost analysis of the lowered (not compiled) forward pass at
batch 1, which counts 2 FLOPs per multiply-add plus the element-wise work
(softmax, GELU, LayerNorm).
"""

import math
import re
import sys
from typing import Any, Optional

import jax
import jax.numpy as jnp

from vit_jax.config.sizes import image_hw
from vit_jax.models import create_model

from vit_jax.errors import ArgumentParser


# Top-level modules, and those inside `Transformer`, in the order the forward pass uses them;
# a hybrid's ResNet (`conv_root`, `gn_root`, `block1`, `block2`, ...) comes first.
FORWARD_ORDER = ['conv_root', 'gn_root', 'block', 'embedding', 'cls', 'registers', 'posembed_input',
                 'encoderblock', 'encoder_norm', 'Transformer', 'MAPHead_0', 'pre_logits', 'head']


def count_by_module(params: dict) -> list[tuple[str, int, int]]:
  """(module, repeats, parameters per repeat) rows; encoder blocks collapse into one row."""
  rows: list[tuple[str, int, int]] = []

  def size(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))

  def forward_order(name: str) -> tuple[int, int]:  # Unknown names go last; block2 after block1.
    stage = re.fullmatch(r'block(\d+)', name)
    if stage:
      return FORWARD_ORDER.index('block'), int(stage.group(1))
    return (FORWARD_ORDER.index(name) if name in FORWARD_ORDER else len(FORWARD_ORDER)), 0
  for name in sorted(params, key=forward_order):
    value = params[name]
    if name != 'Transformer':
      rows.append((name, 1, size(value)))
      continue
    blocks = sorted((k for k in value if re.fullmatch(r'encoderblock_\d+', k)), key=lambda k: int(k[13:]))
    for child in sorted(value, key=lambda k: forward_order(re.sub(r'_\d+$', '', k))[0]):
      sub = value[child]
      if child == 'encoderblock':  # Scanned: one stacked block.
        depth = jax.tree.leaves(sub)[0].shape[0]
        rows.append((f'Transformer/encoderblock_{{0..{depth - 1}}}', depth, size(sub) // depth))
      elif child not in blocks:
        rows.append((f'Transformer/{child}', 1, size(sub)))
      elif child == blocks[0]:
        rows.append((f'Transformer/encoderblock_{{0..{len(blocks) - 1}}}', len(blocks), size(sub)))
  return rows


def flops_per_image(model, image_size) -> float:
  """Forward FLOPs of one image (`image_size`: one side or (height, width)), from XLA's cost
  analysis of the lowered program."""
  images = jax.ShapeDtypeStruct((1, *image_hw(image_size), 3), jnp.float32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(images.shape)))['params']
  lowered = jax.jit(lambda p, x: model.apply({'params': p}, x)[0]).lower(params, images)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def summarize(variant: str, num_classes: int = 1000, image_size=224, **options: Any) -> str:
  """The summary text of `variant` at `image_size` (one side or (height, width)); its last
  line is `total_params: N`. Raises ValueError for a size the patches do not divide."""
  model = create_model(variant, num_classes, **options)
  height, width = image_hw(image_size)
  try:
    grid = model.token_grid(height, width)
  except ValueError as e:
    raise ValueError(f'--image_size {image_size}: {e}') from None
  images = jnp.zeros((1, height, width, 3))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), images))['params']
  rows = count_by_module(params)
  total = sum(repeats * count for _, repeats, count in rows)
  tokens = grid[0] * grid[1] + model.num_prefix_tokens
  backbone = ''
  if model.resnet_stages is not None:
    backbone = (f'ResNet root width {model.resnet_width}, stages {tuple(model.resnet_stages)} '
                f'(stride {model.pixels_per_token // model.patch_size}), {model.patch_size}x'
                f'{model.patch_size} patches of its feature map; ')
  lines = [f'ViT-{variant}: {backbone}hidden {model.hidden_size}, {model.num_layers} layers, MLP '
           f'{model.mlp_dim}, {model.num_heads} heads, pool {model.pool!r}, {num_classes} classes, '
           f'{height}x{width} px = {grid[0]}x{grid[1]} patches, {tokens} tokens',
           f'{"module":<38} {"parameters":>28}']
  for name, repeats, count in rows:
    value = f'{repeats} x {count:,} = {repeats * count:,}' if repeats > 1 else f'{count:,}'
    lines.append(f'{name:<38} {value:>28}')
  gflops = flops_per_image(model, (height, width)) / 1e9
  lines += [f'{"total":<38} {total:>28,}',
            f'GFLOPs per image: {gflops:.4g} (XLA cost analysis of the lowered forward pass, '
            'batch 1; a multiply-add is 2 FLOPs)',
            f'total_params: {total}']
  return '\n'.join(lines)


def main(argv: Optional[list[str]] = None) -> int:
  parser = ArgumentParser(prog='vit-jax summary', description=__doc__.split('\n\n')[1])
  parser.add_argument('variant', help='SIZE/PATCH, e.g. B/16, g/14, tiny/4, or a hybrid, e.g. R50+B/16')
  parser.add_argument('--num_classes', type=int, default=1000, help='classifier head size (default 1000)')
  parser.add_argument('--image_size', type=image_hw, default=224,
                      help='input side in pixels, or HEIGHT,WIDTH (default 224)')
  parser.add_argument('--pool', default='token', choices=('token', 'gap', 'map'),
                      help='pooling (default token)')
  args = parser.parse_args(argv)
  try:
    print(summarize(args.variant, args.num_classes, args.image_size, pool=args.pool), flush=True)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0
