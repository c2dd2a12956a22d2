"""A trained model ready for inference: loaded from a workdir's checkpoint or an exported `.npz`.

`load_workdir(dir, step='latest')` (or 'best', or a step number) and
`load_exported(npz)` return a `Run` (config, model, parameters, class names,
step), which predict, evaluate, export and the
notebook API take. Reads only: it never writes to the workdir.
"""

import dataclasses
import json
import os
import sys
from typing import Any, Optional, Union

import jax
import ml_collections
import numpy as np

from vit_jax import storage
from vit_jax.config.files import load_config, split_argument
from vit_jax.config.sizes import image_hw
from vit_jax.errors import UsageError


@dataclasses.dataclass
class Run:
  """A trained model ready for inference."""
  config: ml_collections.ConfigDict
  model: Any  # vit_jax.models.VisionTransformer
  params: Any
  class_names: list[str]
  step: Optional[int] = None  # Training step of the parameters, when known.
  ema: bool = False  # Whether `params` are the run's exponential moving average (config.ema).

  def __repr__(self) -> str:
    """One line, not the thousands of lines of its config, module and arrays."""
    import jax
    count = sum(leaf.size for leaf in jax.tree.leaves(self.params))
    return (f'Run({self.config.model.variant}, {count:,} parameters, {len(self.class_names)} classes, '
            f'step {self.step}{", EMA parameters" if self.ema else ""})')


def class_names_of(config: ml_collections.ConfigDict) -> list[str]:
  """Class names from the dataset's tfds metadata or image folder's class sub-folders (read without
  indexing its images); class indices if it has none or is missing."""
  from vit_jax.data import pipeline
  try:
    names = pipeline.class_names(config.dataset)
  except UsageError as e:
    print(f'warning: no class names ({e}); showing class indices.', file=sys.stderr)
    names = None
  return list(names) if names else [str(i) for i in range(config.dataset.num_classes)]


def latest_checkpoint(workdir: str) -> tuple[int, str]:
  """(step, path) of the newest finished orbax checkpoint in `workdir/checkpoints`."""
  return select_checkpoint(workdir, 'latest')


def select_checkpoint(workdir: str, step: Union[str, int] = 'latest',
                      config: Optional[ml_collections.ConfigDict] = None) -> tuple[int, str]:
  """(step, path) of the checkpoint that `step` (--step) names: 'latest', 'best' or a step number.

  'best' is the kept checkpoint with the best recorded `config.best_metric`
  (`config` defaults to the workdir's config.json), which the run keeps even
  when it is older than the latest `config.keep_checkpoints`.
  """
  from vit_jax.checkpoint import faults
  directory = storage.absolute(storage.join(workdir, 'checkpoints'))
  steps = sorted(faults.list_steps(directory, reader=True))  # Finished checkpoints only.
  if not steps:
    raise UsageError(f'Workdir {workdir!r} has no checkpoint in checkpoints/ yet; train until the first '
                     'checkpoint (config.checkpoint_every_steps) or pass --checkpoint FILE.npz.')
  kept = ', '.join(map(str, steps))
  if str(step).isdigit():
    chosen = int(step)
    if chosen not in steps:
      raise UsageError(f'--step={step}: workdir {workdir!r} keeps no checkpoint of that step; kept steps: '
                       f'{kept} (or --step latest / best).')
  elif step == 'latest':
    chosen = steps[-1]
  elif step == 'best':
    from vit_jax.checkpoint.manager import best_step
    config = config if config is not None else load_config(storage.join(workdir, 'config.json'))
    if not config.best_metric:
      raise UsageError(f"--step best: workdir {workdir!r} was trained with config.best_metric='', so it "
                       f'keeps no best checkpoint; use --step latest or one of the kept steps: {kept}.')
    found = best_step(workdir, config.best_metric, config.best_mode)
    if found is None:
      raise UsageError(f'--step best: no kept checkpoint of workdir {workdir!r} recorded '
                       f'{config.best_metric} (eval metrics are saved with a checkpoint at eval steps only); '
                       f'use --step latest or one of the kept steps: {kept}.')
    chosen = found
  else:
    raise UsageError(f"--step={step!r}: use 'latest', 'best' or a step number; kept steps: {kept}.")
  return chosen, storage.join(directory, str(chosen), 'default')


def restore_params(path: str, abstract_params: Any, field: str = 'params') -> Any:
  """Only the `params` (or another field, e.g. 'ema_params') of an orbax train-state checkpoint,
  on this process's first device.

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
          item={field: abstract_params}, restore_args={field: restore_args}, partial_restore=True))
  except Exception as e:  # Orbax raises many types, for damage, faults and mismatched files alike.
    from vit_jax.checkpoint import faults
    step_dir = storage.dirname(path)
    unavailable = faults.unavailable_reason(e, step_dir)
    if unavailable:
      raise faults.unavailable_error(f'checkpoint {step_dir}', unavailable, reader=True) from None
    raise UsageError(f'Cannot read the parameters of checkpoint {path} ({faults.first_line(e)}): it is '
                     "damaged, or the workdir's config.json is not the one that wrote it; pick another "
                     'checkpoint with --step N (nothing was moved).') from None
  return tree[field]


def load_workdir(workdir: str, ema: bool = False, step: Union[str, int] = 'latest') -> Run:
  """The parameters of a checkpoint in `workdir`, with the run's config and model.

  `step` picks the checkpoint: 'latest' (default), 'best' (config.best_metric)
  or a step number (select_checkpoint).

  With `ema`, the exponential moving average of the parameters (a run trained
  with config.ema.decay > 0) instead of the raw ones.
  """
  from vit_jax.models import model_from_config

  storage.check_supported(workdir or '', '--workdir')
  config_path = storage.join(workdir, 'config.json')
  try:
    found = storage.isdir(workdir or '.') and storage.isfile(config_path)
    config = load_config(config_path) if found else None
  except (UsageError, FileNotFoundError):
    raise
  except Exception as e:  # OSError locally; gcsfs' errors (HTTP 401/403, server down) in a bucket.
    if storage.is_url(workdir):
      raise UsageError(storage.bucket_error(workdir, '--workdir', e, reading=True)) from None
    from vit_jax.checkpoint import faults
    raise faults.unavailable_error(f'workdir {workdir!r}', f'{storage.describe_error(e)} on {config_path}',
                                   reader=True) from None
  if config is None and not storage.isdir(workdir or '.'):
    raise UsageError(f'Workdir {workdir!r} does not exist; pass the --workdir of a training run '
                     '(vit-jax train --config ... --workdir DIR).')
  if config is None:
    raise UsageError(f'No config.json in workdir {workdir!r}; pass the --workdir of a training run '
                     '(python -m vit_jax.main --config ... --workdir DIR).')
  if ema and not config.ema.decay:
    raise UsageError(f'--ema: workdir {workdir!r} was trained without EMA (config.ema.decay=0), so its '
                     'checkpoints hold no averaged parameters; drop --ema, or train with '
                     '--config.ema.decay=0.9999.')
  model = model_from_config(config)
  step, path = select_checkpoint(workdir, step, config)
  height, width = image_hw(config.input.image_size)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, height, width, 3), np.float32)))
  params = restore_params(path, abstract['params'], 'ema_params' if ema else 'params')
  return Run(config, model, params, class_names_of(config), step, ema=ema)


def config_path_for(npz_path: str) -> str:
  """The JSON written beside an exported `.npz`: same path, `.json` suffix."""
  return os.path.splitext(npz_path)[0] + '.json'


def load_exported(npz_path: str, config_path: Optional[str] = None) -> Run:
  """The Run of an exported `.npz`, with the config at `config_path` (default: the JSON beside it).

  `config_path` may also be a workdir's config.json or a configs/*.py file;
  then class names come from the dataset's metadata. `npz_path` may be a
  published name or a URL (`vit_jax.checkpoint.published`); those have no
  JSON beside them, so they need `config_path` (eval-only mode).
  """
  from vit_jax import checkpoint
  from vit_jax.models import model_from_config

  config_path = config_path or config_path_for(npz_path)
  if not storage.isfile(split_argument(config_path)[0]):  # configs/image_folder.py:PATH names a file too.
    raise UsageError(f'No config for {npz_path!r}: {config_path!r} does not exist; pass --config with '
                     'the .json written by vit-jax export, a workdir config.json or a configs/*.py file '
                     '(for a published checkpoint: one whose model and dataset fit it).')
  config = load_config(config_path)
  model = model_from_config(config)
  params = checkpoint.load_for_model(npz_path, model, config.input.image_size)
  params = jax.device_put(jax.tree.map(np.asarray, params), jax.local_devices()[0])
  names, step = None, None
  if config_path.endswith('.json'):
    meta: dict[str, Any] = json.loads(storage.read_text(config_path))
    names, step = meta.get('class_names'), meta.get('step')
  return Run(config, model, params, names or class_names_of(config), step)


def define_run_flags() -> None:
  """The flags that name a trained run, defined once for every command that reads one.

  --workdir (with --step and --ema) or --checkpoint (with --config); `run_from_flags` takes them.
  Defined when a command runs (vit_jax/cli.py), never at import.
  """
  from absl import flags
  flags.DEFINE_string('workdir', None, "Training workdir: its config.json and a checkpoint (--step).")
  flags.DEFINE_string('checkpoint', None, 'Parameters: a .npz from vit-jax export, a gs:// or https:// '
                      'URL, or a published name such as augreg:B/16.')
  flags.DEFINE_string('config', None, 'With --checkpoint: the config (by default the .json beside the '
                      '.npz; also a workdir config.json or a configs/*.py file, e.g. for a published one).')
  flags.DEFINE_string('step', 'latest', "With --workdir: the checkpoint: 'latest', 'best' (the kept "
                      "checkpoint best in the run's config.best_metric) or a step number.")
  flags.DEFINE_bool('ema', False, 'With --workdir: use the exponential moving average of the parameters '
                    '(a run trained with config.ema.decay > 0).')


def run_from_flags(workdir: Optional[str], checkpoint: Optional[str], config: Optional[str],
                   ema: bool = False, step: Union[str, int] = 'latest') -> Run:
  """The Run that --workdir, or --checkpoint with --config, names (shared by the launchers).

  `ema` (--ema) takes a workdir's averaged parameters; an exported .npz holds
  one set of parameters, chosen when it was exported (`export --ema`). `step`
  (--step: 'latest', 'best' or a number) picks a workdir's checkpoint.
  """
  if bool(workdir) == bool(checkpoint):
    raise UsageError(f'Pass exactly one of --workdir (got {workdir!r}) and --checkpoint (got '
                     f'{checkpoint!r}); --checkpoint takes a .npz from vit-jax export, a URL or a published name.')
  if workdir:
    if config:
      raise UsageError(f'--config={config!r} is only used with --checkpoint; a workdir has its config.json.')
    return load_workdir(workdir, ema=ema, step=step)
  if str(step) != 'latest':
    raise UsageError(f'--step={step} picks a checkpoint of a --workdir; {checkpoint!r} holds one set of '
                     'parameters, chosen when it was exported (`vit-jax export --workdir DIR --step ...`).')
  if ema:
    raise UsageError(f'--ema needs --workdir: {checkpoint!r} holds one set of parameters; export the '
                     'averaged ones with `vit-jax export --workdir DIR --ema` and drop --ema here.')
  return load_exported(checkpoint, config)
