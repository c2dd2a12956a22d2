"""The paper's fine-tuning setup, shared by configs/finetune_*.py (not a config itself).

Dosovitskiy et al. (2020), Appendix B.1.1 and Table 4: SGD with momentum 0.9,
batch 512, cosine decay, no weight decay, gradients clipped at global norm 1,
resolution 384, the head replaced by a zero-initialised one; steps per dataset
(CIFAR-10/100 10,000; Oxford-IIIT Pets and Oxford Flowers-102 500) and a
learning rate picked from {0.001, 0.003, 0.01, 0.03} on a held-out split.
Warm-up is not in Table 4: 500 steps is the released fine-tuning code's
default (google-research/vision_transformer, configs/common.py); the 500-step
datasets use 50 here. Training images get an Inception crop (min area 0.05, as
in that code) and flips; evaluation resizes the whole image to 384 px.
"""

import ml_collections

from configs import datasets
from vit_jax.config import defaults

PRETRAINED = 'ViT-B_16.npz'  # ImageNet-21k ViT-B/16 of the original release (gs://vit_models/imagenet21k/).


def paper_setup(dataset: str, total_steps: int, warmup_steps: int,
                learning_rate: float = 0.03) -> ml_collections.ConfigDict:
  """Base config changed to fine-tune ViT-B/16 from PRETRAINED on dataset preset `dataset`."""
  config = datasets.apply(defaults.get_config(), dataset)
  config.batch_size = 512
  config.eval_batch_size = 512
  config.total_steps = total_steps
  config.log_every_steps = 50
  config.eval_every_steps = max(total_steps // 10, 50)
  config.checkpoint_every_steps = max(total_steps // 10, 50)

  config.input.image_size = 384
  config.input.train_crop = 'random_resized'
  config.input.crop_min_area = 0.05
  config.input.flip = True

  config.model.variant = 'B/16'
  config.model.dropout_rate = 0.0
  config.init.path = PRETRAINED  # Override with --config.init.path=/where/you/put/ViT-B_16.npz.
  config.init.reset_head = True

  config.optimizer.name = 'sgd'
  config.optimizer.momentum = 0.9
  config.optimizer.learning_rate = learning_rate  # Sweep {0.001, 0.003, 0.01, 0.03}.
  config.optimizer.schedule = 'cosine'
  config.optimizer.warmup_steps = warmup_steps
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip_norm = 1.0
  config.optimizer.label_smoothing = 0.0
  return config
