"""ViT-B/32 on ImageNet-1k with the ViT-B/16 setup of configs/vit_b16.py.

  python -m vit_jax.main --config configs/vit_b32.py --workdir workdirs/vit_b32
"""

from configs import vit_b16


def get_config():
  config = vit_b16.get_config()
  config.model.variant = 'B/32'
  return config
