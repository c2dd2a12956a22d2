"""FlexiViT (Beyer et al. 2023): one model trained at patch sizes 2, 4 and 8 against a model per patch size.

  vit-jax sweep experiments/flexivit.py --workdir /tmp/sweeps/flexivit --parallel 2
  vit-jax evaluate --workdir /tmp/sweeps/flexivit/model.variant=Ti_4,model.patch_sizes=_2,4,8_,seed=0 --patch_size 2 --out_dir /tmp/sweeps/flexivit/flexi_p2

The quickstart ViT (16x16 digits) shortened to 200 steps (50 warm-up), trained at patch
size 2 (64 tokens), 4 (16 tokens) and 8 (4 tokens) alone, and once as a FlexiViT whose
steps draw 2 (64 tokens), 4 or 8 (parameters stored at 4, PI-resized per
step). The FlexiViT run is then evaluated at each patch size with `vit-jax
evaluate --patch_size N` (its own eval is at 4), and so is the Ti/4 model
trained alone, at 2 and 8. FlexiViT reports that one flexible model matches
or beats the models trained at each patch size alone, while a standard model
falls apart at patch sizes it was not trained at.
"""

BASE_CONFIG = 'configs/quickstart.py'
OVERRIDES = {
    'total_steps': 200,  # A sixth of the quickstart's 1,200, to fit a machine shared by five jobs.
    'optimizer.warmup_steps': 50,
    'eval_every_steps': 100,
    'checkpoint_every_steps': 200,
    'log_every_steps': 25,
}
TRIALS = [
    {'model.variant': 'Ti/4'},
    {'model.variant': 'Ti/8'},
    {'model.variant': 'Ti/4', 'model.patch_sizes': (2, 4, 8)},
    {'model.variant': 'Ti/2'},  # 64 tokens: several times a Ti/4 step; added later (`--trial 3`).
]
SEEDS = 1
METRIC = 'eval/accuracy'
MODE = 'max'
