"""Muon against AdamW at the same steps, at two learning rates each.

  vit-jax sweep experiments/muon.py --workdir /tmp/sweeps/muon --parallel 2

Muon (optax.contrib.muon) updates the encoder's kernels with orthogonalised
momentum, scaled to AdamW's update RMS (0.2, Liu et al. 2025) so that one
learning rate serves both; AdamW updates the embeddings, norms, biases and
head. Here: the quickstart ViT shortened to 200 steps (50 warm-up) (the same warm-up and
cosine schedule for both), peak learning rates 1e-3 (the quickstart's) and
3e-3, one seed: 4 trials.
"""

BASE_CONFIG = 'configs/quickstart.py'
OVERRIDES = {
    'total_steps': 200,  # A sixth of the quickstart's 1,200, to fit a machine shared by five jobs.
    'optimizer.warmup_steps': 50,
    'eval_every_steps': 100,
    'checkpoint_every_steps': 200,
    'log_every_steps': 25,
}
GRID = {
    'optimizer.name': ['adamw', 'muon'],
    'optimizer.learning_rate': [1e-3, 3e-3],
}
SEEDS = 1
METRIC = 'eval/accuracy'
MODE = 'max'
