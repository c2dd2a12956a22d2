"""Position embeddings since the paper: learned, sine-cosine, 2-D RoPE axial and mixed, and learned
next to axial RoPE, each trained at 16 px and evaluated at 16, 24 (1.5x) and 32 px (2x).

  vit-jax sweep experiments/posemb_rope.py --workdir /tmp/sweeps/posemb_rope --parallel 2
  vit-jax evaluate --workdir /tmp/sweeps/posemb_rope/TRIAL --max_tokens 36 --out_dir /tmp/sweeps/posemb_rope/TRIAL/eval24
  vit-jax evaluate --workdir /tmp/sweeps/posemb_rope/TRIAL --max_tokens 64 --out_dir /tmp/sweeps/posemb_rope/TRIAL/eval32

The quickstart ViT (16x16 digits, 4x4 patches, 16 tokens) shortened to 400
steps, one seed per point: 5 trials, about 8 minutes on 2 CPU cores. The sweep
reports the accuracy at the training resolution; `vit-jax evaluate
--max_tokens N` then feeds each test digit as N patches (6x6 = 36 at 24 px,
8x8 = 64 at 32 px, NaFlex batches): the learned table is resized to the larger
grid as a checkpoint loaded at another resolution is, sine-cosine and RoPE are
computed at the new patch coordinates, nothing is retrained.
"""

BASE_CONFIG = 'configs/quickstart.py'
OVERRIDES = {
    'total_steps': 400,
    'eval_every_steps': 100,
    'checkpoint_every_steps': 200,
    'log_every_steps': 50,
}
GRID = {'model.posemb': ['learn', 'sincos2d', 'rope_axial', 'rope_mixed', 'learn+rope_axial']}
SEEDS = 1
METRIC = 'eval/accuracy'
MODE = 'max'
