"""ViT-S/16 on ImageNet-1k with the ViT-B/16 setup of configs/vit_b16.py.

  python -m vit_jax.main --config configs/vit_s16.py --workdir workdirs/vit_s16
"""

from configs import vit_b16


def get_config():
  config = vit_b16.get_config()
  config.model.variant = 'S/16'
  return config
