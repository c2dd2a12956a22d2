"""Fine-tune the ImageNet-21k ViT-B/16 on Oxford Flowers-102 at 384 px, with the paper's setup.

  python -m vit_jax.main --config configs/finetune_flowers102.py --workdir workdirs/finetune_flowers102 --config.init.path=ViT-B_16.npz

Oxford Flowers-102 from tfds ('oxford_flowers102', prepared in array_record format, see README
"Data"); ViT-B_16.npz is the original release's ImageNet-21k checkpoint (any
ViT-B/16 .npz in the original or big_vision layout, or one of our workdirs,
works). 500 steps of batch 512, SGD momentum 0.9, cosine, no weight decay,
clip 1 (configs/finetune_common.py). Sweep the learning rate over the paper's
grid with --config.optimizer.learning_rate={0.001,0.003,0.01,0.03}. Should
reach: for reference, the paper's Table 2 gives ViT-L/16 (ImageNet-21k) 99.61%
on Oxford Flowers-102; ViT-B/16 lands somewhat below. Not run on this project's machine.
"""

from configs import finetune_common


def get_config():
  return finetune_common.paper_setup('oxford_flowers102', total_steps=500, warmup_steps=50)
