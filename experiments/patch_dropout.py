"""Token dropping (PatchDropout, Liu et al. 2022): accuracy and training speed against the share dropped.

  vit-jax sweep experiments/patch_dropout.py --workdir /tmp/sweeps/patch_dropout --parallel 2

Each training image keeps a random (1 - rate) of its 16 patch tokens (the
class token always); evaluation keeps all. PatchDropout reports that dropping
about half of the tokens costs little accuracy and saves compute in
proportion. Here: the quickstart ViT shortened to 200 steps (50 warm-up), rates 0, 0.25,
0.5 and 0.75, one seed: 4 trials. Their training speed is measured apart,
the four train steps side by side in one process: experiments/patch_dropout/speed.py.
"""

BASE_CONFIG = 'configs/quickstart.py'
OVERRIDES = {
    'total_steps': 200,  # A sixth of the quickstart's 1,200, to fit a machine shared by five jobs.
    'optimizer.warmup_steps': 50,
    'eval_every_steps': 100,
    'checkpoint_every_steps': 200,
    'log_every_steps': 25,
}
GRID = {'model.patch_dropout': [0.0, 0.25, 0.5, 0.75]}
SEEDS = 1
METRIC = 'eval/accuracy'
MODE = 'max'
