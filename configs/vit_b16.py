"""ViT-B/16 trained from scratch on ImageNet-1k, with the paper's setup.

  python -m vit_jax.main --config configs/vit_b16.py --workdir workdirs/vit_b16

Dosovitskiy et al. (2020), Table 3 (ImageNet row for ViT-B/{16,32}): Adam with
beta1=0.9, beta2=0.999, batch 4096, base learning rate 3e-3 with 10k steps of
linear warm-up and cosine decay, weight decay 0.3, dropout 0.1, gradients
clipped at global norm 1, 300 epochs at 224 px; Inception crop and flips;
pixels in [-1, 1]. The paper reports 77.9% top-1 for B/16 trained this way
(Table 5, "ImageNet" pre-training, evaluated at 384 px after fine-tuning).
Needs imagenet2012 prepared in array_record format (see README, "Data"); for
another tfds dataset set --config.dataset.name and --config.dataset.num_classes.
"""

from vit_jax.config import defaults

IMAGENET_TRAIN_EXAMPLES = 1_281_167


def get_config():
  config = defaults.get_config()
  config.batch_size = 4096
  config.eval_batch_size = 4096
  config.total_steps = 300 * IMAGENET_TRAIN_EXAMPLES // config.batch_size  # 300 epochs.
  config.log_every_steps = 100
  config.eval_every_steps = 2000
  config.checkpoint_every_steps = 1000

  config.dataset.name = 'imagenet2012'
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'validation'
  config.dataset.num_classes = 1000

  config.input.image_size = 224
  config.input.train_crop = 'random_resized'
  config.input.crop_min_area = 0.08
  config.input.flip = True

  config.model.variant = 'B/16'
  config.model.dropout_rate = 0.1

  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 3e-3
  config.optimizer.schedule = 'cosine'
  config.optimizer.warmup_steps = 10_000
  config.optimizer.weight_decay = 0.3
  config.optimizer.grad_clip_norm = 1.0
  return config
