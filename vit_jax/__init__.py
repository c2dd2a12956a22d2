"""vit_jax: Vision Transformers in JAX/Flax, from a laptop CPU to multi-host pods.

What a notebook needs, importable from here (each loads its layer only when
first used, so `import vit_jax` does no work):

  create_model(variant, num_classes, **options)  the Flax ViT (vit_jax.models)
  load_npz(path) / save_npz(params, path)        the published .npz layout (vit_jax.checkpoint)
  load_for_model(path, model, image_size)        published parameters fitted to a model
  load_workdir(dir) / load_exported(npz)         a trained run: config, model, params, class names
  predict_logits(run, files)                     logits of image files (vit_jax.tools.predict)
  load_images(config, files)                     image files as the model sees them (eval preprocessing)
  attention_maps(intermediates, model, hw)       rollout and last-layer maps (vit_jax.tools.attention_maps)
  train_and_evaluate(config, workdir)            the training loop (vit_jax.training.loop)
  plot_curves(workdirs, out)                     training curves of workdirs as a PNG (vit_jax.tools.plots)
  get_config()                                   the default config (vit_jax.config.defaults)
  retain_freed_memory()                          on CPU, first thing: the launcher's host-memory
                                                 settings for your own loop (vit_jax.cpu.hostmem)
"""

import importlib
from typing import Any

__version__ = '0.2.0'

_API = {
    'create_model': 'vit_jax.models.variants',
    'load_npz': 'vit_jax.checkpoint.npz',
    'save_npz': 'vit_jax.checkpoint.npz',
    'load_for_model': 'vit_jax.checkpoint.npz',
    'Run': 'vit_jax.checkpoint.run',
    'load_workdir': 'vit_jax.checkpoint.run',
    'load_exported': 'vit_jax.checkpoint.run',
    'predict_logits': 'vit_jax.tools.predict',
    'load_images': 'vit_jax.tools.predict',
    'plot_curves': 'vit_jax.tools.plots',
    'attention_maps': 'vit_jax.tools.attention_maps',
    'train_and_evaluate': 'vit_jax.training.loop',
    'get_config': 'vit_jax.config.defaults',
    'retain_freed_memory': 'vit_jax.cpu.hostmem',
}

__all__ = sorted(_API) + ['__version__']


def __getattr__(name: str) -> Any:
  if name not in _API:
    raise AttributeError(f'module vit_jax has no attribute {name!r}')
  value = getattr(importlib.import_module(_API[name]), name)
  globals()[name] = value  # Later lookups skip this function.
  return value


def __dir__() -> list[str]:
  return __all__
