"""Position embeddings: none, learned 1-D, fixed 2-D sin-cos (paper appendix D.4, Table 8).

  vit-jax sweep experiments/posemb.py --workdir /tmp/sweeps/posemb --parallel 2

The paper (Table 8: ViT-B/16, ImageNet 5-shot linear accuracy) finds any
position embedding clearly better than none (about 64% vs 61.4%), and learned
1-D, learned 2-D and relative embeddings about equal. Here: the quickstart ViT (16x16 digits, 4x4
patches, 16 tokens) shortened to 400 steps, 2 seeds per point: 6 trials,
about 10 minutes on 2 CPU cores.
"""

BASE_CONFIG = 'configs/quickstart.py'
OVERRIDES = {
    'total_steps': 400,  # A third of the quickstart's 1,200: the cosine schedule is compressed too.
    'eval_every_steps': 100,
    'checkpoint_every_steps': 200,
    'log_every_steps': 50,
}
GRID = {'model.posemb': ['none', 'learn', 'sincos2d']}
SEEDS = 2
METRIC = 'eval/accuracy'
MODE = 'max'
