"""Reading configs: a `configs/*.py` file, or the JSON a workdir or an export wrote."""

import importlib.util
import json
import os

import ml_collections

from vit_jax.config import defaults
from vit_jax.errors import UsageError


def load_config(path: str) -> ml_collections.ConfigDict:
  """A locked config from a run's `config.json` (or an export's JSON), or a `configs/*.py` file.

  JSON values are laid over `vit_jax.config.defaults`, so keys added since the run
  was trained take their defaults.
  """
  if not os.path.isfile(path):
    raise UsageError(f'Config file {path!r} does not exist; pass a workdir config.json, the .json '
                     'written by vit_jax.tools.export, or a configs/*.py file.')
  if path.endswith('.py'):
    spec = importlib.util.spec_from_file_location('vit_jax_predict_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
  else:
    with open(path) as f:
      saved = json.load(f)
    saved = saved.get('config', saved)  # An export's JSON nests the config next to class names.
    config = defaults.get_config()
    config.update(saved)
  config.lock()
  return config
