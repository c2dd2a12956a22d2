"""Patch size, depth and width at a fixed compute budget (about 0.012 GFLOPs per image).

  vit-jax sweep experiments/patch_depth_width.py --workdir /tmp/sweeps/pdw --parallel 2

Every point costs within 10% of the quickstart ViT's forward FLOPs at 16x16
pixels (vit_jax.tools.summary's count from XLA's cost analysis, a multiply-add is 2
FLOPs; the report's GFLOPs column recomputes them). The MLP is always twice
the width, as in the quickstart.

  patch 4 (16 tokens), width 96, depth 4, 3 heads (the quickstart)  0.01166 GFLOPs    306,730 params
  patch 2 (64 tokens), width 48, depth 3, 3 heads                   0.01137 GFLOPs     61,258 params
  patch 8 (4 tokens), width 192, depth 4, 3 heads                   0.01278 GFLOPs  1,228,618 params
  patch 4, wide and shallow: width 192, depth 1, 3 heads            0.01109 GFLOPs    312,202 params
  patch 4, narrow and deep: width 64, depth 9, 2 heads              0.01235 GFLOPs    306,314 params

The paper (Section 4.4, Figure 8) scales these dimensions up from a base
model rather than trading them at a fixed cost; it finds depth helps most,
width least, and smaller patches (longer sequences) help robustly without
adding parameters. Trials are the quickstart shortened to 400 steps, 2 seeds:
10 trials, about 12 minutes on 2 CPU cores.
"""

BASE_CONFIG = 'configs/quickstart.py'
OVERRIDES = {
    'total_steps': 400,
    'eval_every_steps': 100,
    'checkpoint_every_steps': 200,
    'log_every_steps': 50,
}


def _point(patch: int, width: int, depth: int, heads: int) -> dict:
  return {'model.variant': f'Ti/{patch}', 'model.hidden_size': width, 'model.num_layers': depth,
          'model.mlp_dim': 2 * width, 'model.num_heads': heads}


TRIALS = [
    _point(patch=4, width=96, depth=4, heads=3),
    _point(patch=2, width=48, depth=3, heads=3),
    _point(patch=8, width=192, depth=4, heads=3),
    _point(patch=4, width=192, depth=1, heads=3),
    _point(patch=4, width=64, depth=9, heads=2),
]
SEEDS = 2
METRIC = 'eval/accuracy'
MODE = 'max'
