"""A trained model ready for inference: loaded from a workdir's latest checkpoint or an exported `.npz`.

`load_workdir(dir)` and `load_exported(npz)` return a `Run` (config, model,
parameters, class names, step), which predict, evaluate, export and the
notebook API take. Reads only: it never writes to the workdir.
"""

import dataclasses
import json
import os
import sys
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from vit_jax.config.files import load_config
from vit_jax.errors import UsageError


@dataclasses.dataclass
class Run:
  """A trained model ready for inference."""
  config: ml_collections.ConfigDict
  model: Any  # vit_jax.models.VisionTransformer
  params: Any
  class_names: list[str]
  step: Optional[int] = None  # Training step of the parameters, when known.


def class_names_of(config: ml_collections.ConfigDict) -> list[str]:
  """Class names from the dataset's tfds metadata; class indices if it has none or is missing."""
  from vit_jax.data import pipeline
  try:
    names = pipeline.open_split(config.dataset, config.dataset.eval_split).class_names
  except UsageError as e:
    print(f'warning: no class names ({e}); showing class indices.', file=sys.stderr)
    names = None
  return list(names) if names else [str(i) for i in range(config.dataset.num_classes)]


def latest_checkpoint(workdir: str) -> tuple[int, str]:
  """(step, path) of the newest finished orbax checkpoint in `workdir/checkpoints`."""
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  # Finished checkpoints are renamed to their step; orbax's temporary ones are not all digits.
  steps = sorted(int(name) for name in os.listdir(directory) if name.isdigit()) if os.path.isdir(directory) else []
  if not steps:
    raise UsageError(f'Workdir {workdir!r} has no checkpoint in checkpoints/ yet; train until the first '
                     'checkpoint (config.checkpoint_every_steps) or pass --checkpoint FILE.npz.')
  return steps[-1], os.path.join(directory, str(steps[-1]), 'default')


def restore_params(path: str, abstract_params: Any) -> Any:
  """Only the `params` of an orbax train-state checkpoint, on this process's first device.

  A partial restore: it reads no optimizer state and never writes to the
  workdir, so it works on a run that is still training.
  """
  import orbax.checkpoint as ocp

  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=device, global_shape=x.shape, dtype=x.dtype), abstract_params)
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      tree = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
          item={'params': abstract_params}, restore_args={'params': restore_args}, partial_restore=True))
  except Exception as e:  # Orbax raises many types for missing or mismatched files.
    reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
    raise UsageError(f'Cannot read the parameters of checkpoint {path} ({reason}); check that the '
                     "workdir's config.json is the one that wrote it.") from None
  return tree['params']


def load_workdir(workdir: str) -> Run:
  """The parameters of the latest orbax checkpoint in `workdir`, with the run's config and model."""
  from vit_jax.models import model_from_config

  config_path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(config_path):
    raise UsageError(f'No config.json in workdir {workdir!r}; pass the --workdir of a training run '
                     '(python -m vit_jax.main --config ... --workdir DIR).')
  config = load_config(config_path)
  model = model_from_config(config)
  step, path = latest_checkpoint(workdir)
  size = config.input.image_size
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, size, size, 3), np.float32)))
  return Run(config, model, restore_params(path, abstract['params']), class_names_of(config), step)


def config_path_for(npz_path: str) -> str:
  """The JSON written beside an exported `.npz`: same path, `.json` suffix."""
  return os.path.splitext(npz_path)[0] + '.json'


def load_exported(npz_path: str, config_path: Optional[str] = None) -> Run:
  """The Run of an exported `.npz`, with the config at `config_path` (default: the JSON beside it).

  `config_path` may also be a workdir's config.json or a configs/*.py file;
  then class names come from the dataset's metadata.
  """
  from vit_jax import checkpoint
  from vit_jax.models import model_from_config

  config_path = config_path or config_path_for(npz_path)
  if not os.path.isfile(config_path):
    raise UsageError(f'No config for {npz_path!r}: {config_path!r} does not exist; pass --config with '
                     'the .json written by vit_jax.tools.export, a workdir config.json or a configs/*.py file.')
  config = load_config(config_path)
  model = model_from_config(config)
  params = checkpoint.load_for_model(npz_path, model, config.input.image_size)
  params = jax.device_put(jax.tree.map(np.asarray, params), jax.local_devices()[0])
  names, step = None, None
  if config_path.endswith('.json'):
    with open(config_path) as f:
      meta: dict[str, Any] = json.load(f)
    names, step = meta.get('class_names'), meta.get('step')
  return Run(config, model, params, names or class_names_of(config), step)


def run_from_flags(workdir: Optional[str], checkpoint: Optional[str], config: Optional[str]) -> Run:
  """The Run that --workdir, or --checkpoint with --config, names (shared by the launchers)."""
  if bool(workdir) == bool(checkpoint):
    raise UsageError(f'Pass exactly one of --workdir (got {workdir!r}) and --checkpoint (got '
                     f'{checkpoint!r}); --checkpoint takes a .npz from vit_jax.tools.export.')
  if workdir:
    if config:
      raise UsageError(f'--config={config!r} is only used with --checkpoint; a workdir has its config.json.')
    return load_workdir(workdir)
  return load_exported(checkpoint, config)
