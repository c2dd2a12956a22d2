"""Class token vs global average pooling at three learning rates (paper appendix D.3, Figure 9).

  vit-jax sweep experiments/pooling.py --workdir /tmp/sweeps/pooling --parallel 2

The paper finds that a class token and GAP work equally well, but at different
learning rates: GAP at the class token's 8e-4 does much worse than GAP at
3e-4. Here: the quickstart ViT shortened to 400 steps, pool in {token, gap} x
peak learning rate in {3e-4, 8e-4} (the paper's two values, for ViT-B at batch
4096) and 3e-3 (above the quickstart's 1e-3, for our batch of 128), 2 seeds
per point: 12 trials, about 12 minutes on 2 CPU cores.
"""

BASE_CONFIG = 'configs/quickstart.py'
OVERRIDES = {
    'total_steps': 400,
    'eval_every_steps': 100,
    'checkpoint_every_steps': 200,
    'log_every_steps': 50,
}
GRID = {
    'model.pool': ['token', 'gap'],
    'optimizer.learning_rate': [3e-4, 8e-4, 3e-3],
}
SEEDS = 2
METRIC = 'eval/accuracy'
MODE = 'max'
