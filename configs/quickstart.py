"""A small ViT on the bundled scikit-learn digits, on CPU, in about 3 minutes.

  vit-jax train --config configs/quickstart.py --workdir workdirs/quickstart

The 8x8 digits (1,437 training images) are upsampled to 16x16 with
Inception-style random crops of at least half the image, and cut into 4x4
patches (16 tokens). A 4-layer, 96-wide ViT trained for 1,200 steps reaches
about 98% accuracy on the 360 test images on 2 CPU cores (see README).
"""

from vit_jax.config import defaults


def get_config():
  config = defaults.get_config()
  config.batch_size = 128
  config.total_steps = 1200
  config.log_every_steps = 100
  config.eval_every_steps = 400
  config.checkpoint_every_steps = 400

  config.input.image_size = 16
  config.input.train_crop = 'random_resized'
  config.input.crop_min_area = 0.5
  config.input.flip = False  # Digits are not mirror-symmetric.

  # Ti/4 made shallower and narrower: the digits need far less than Ti.
  config.model.variant = 'Ti/4'
  config.model.hidden_size = 96
  config.model.num_layers = 4
  config.model.mlp_dim = 192
  config.model.num_heads = 3
  config.model.dropout_rate = 0.1

  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.weight_decay = 1e-4
  config.optimizer.label_smoothing = 0.1
  return config
