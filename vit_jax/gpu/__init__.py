"""GPU-only speed code: cuDNN's flash attention, which the CUDA train step opts into
(vit_jax/training/platform.py). The model itself never imports it."""
