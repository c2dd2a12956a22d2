"""A ViT-Ti/16 on your own images: a folder with one sub-folder per class.

  python -m vit_jax.main --config configs/image_folder.py:PATH --workdir workdirs/my_images

PATH holds `CLASS/IMAGE` files (JPEG, PNG, GIF or BMP, any size), or is
pre-split into `PATH/train/CLASS/...` and `PATH/test/CLASS/...`; without
`train/`, a fixed 10% of each class (`--config.dataset.test_fraction`) is held
out for evaluation. Files that do not decode are skipped and counted in the
log. The number of classes is read from the folder names here, so nothing
else needs setting; the eval accuracy reached depends entirely on the images
(ViTs trained from scratch need many; start from a pretrained model with
--config.init.path for a few hundred per class).

The recipe is the "light" AugReg one (Steiner et al. 2021): 224 px Inception
crops, flips, RandAugment with 2 layers at magnitude 10, AdamW, cosine decay.
On a 2-core CPU a Ti/16 step of 64 images takes a few seconds; lower
--config.input.image_size (with a smaller patch, e.g. --config.model.variant=Ti/8)
for quick experiments.
"""

import os

from vit_jax.config import defaults
from vit_jax.data.builders import image_folder


def get_config(path: str = ''):
  config = defaults.get_config()
  config.dataset.name = 'image_folder'
  config.dataset.folder = path
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'test'
  # Errors (missing folder, one class) are raised with a clear message when the
  # data is opened; here a bad path just leaves the default.
  if path and os.path.isdir(path):
    # At least 2, so that a one-class folder reaches its clear error rather than the model's.
    config.dataset.num_classes = max(len(image_folder.class_names(path)), 2)

  config.batch_size = 64
  config.eval_batch_size = 128
  config.total_steps = 2000
  config.log_every_steps = 20
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500

  config.input.image_size = 224
  config.input.train_crop = 'random_resized'
  config.input.crop_min_area = 0.08
  config.input.flip = True
  config.input.randaugment.num_layers = 2
  config.input.randaugment.magnitude = 10

  config.model.variant = 'Ti/16'
  config.model.dropout_rate = 0.0

  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 200
  config.optimizer.weight_decay = 0.1
  config.optimizer.label_smoothing = 0.1
  return config
