"""Fine-tune the ImageNet-21k ViT-B/16 on CIFAR-10 at 384 px, with the paper's setup.

  python -m vit_jax.main --config configs/finetune_cifar10.py --workdir workdirs/finetune_cifar10 --config.init.path=ViT-B_16.npz

CIFAR-10 from tfds ('cifar10', prepared in array_record format, see README
"Data"); ViT-B_16.npz is the original release's ImageNet-21k checkpoint (any
ViT-B/16 .npz in the original or big_vision layout, or one of our workdirs,
works). 10_000 steps of batch 512, SGD momentum 0.9, cosine, no weight decay,
clip 1 (configs/finetune_common.py). Sweep the learning rate over the paper's
grid with --config.optimizer.learning_rate={0.001,0.003,0.01,0.03}. Should
reach: for reference, the paper's Table 2 gives ViT-L/16 (ImageNet-21k) 99.15%
on CIFAR-10; ViT-B/16 lands somewhat below. Not run on this project's machine.
"""

from configs import finetune_common


def get_config():
  return finetune_common.paper_setup('cifar10', total_steps=10_000, warmup_steps=500)
