"""The orbax checkpoint manager: save the train state, resume from the newest valid one.

Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a crash mid-write never leaves a half checkpoint under its step
name. A checkpoint that is damaged afterwards (truncated, deleted files) is
detected at restore: it is moved to `workdir/corrupt_checkpoints/` and the
next older one is used.
"""

import json
import os
import re
import shutil
import tempfile
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from vit_jax.errors import UsageError

# Config keys that change the shapes of the train state: a workdir whose
# checkpoints were written with other values belongs to a different model.
MODEL_KEYS = ('model', 'dataset.num_classes', 'input.image_size', 'optimizer.name')
# Fields of config.model that change how the model is computed, not its
# parameters: a run may resume with other values (e.g. remat switched on to
# fit in memory).
COMPUTE_ONLY_MODEL_KEYS = ('remat', 'attention', 'dtype')


def create_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """An orbax manager over `workdir/checkpoints`.

  Keeps the latest `config.keep_checkpoints` steps and, if
  `config.best_metric` is set, also the one with the best value of that eval
  metric. Saves are asynchronous: `save` returns once the state is copied to
  host and the write to disk overlaps the next training steps.
  """
  policies = [checkpoint_managers.LatestN(n=config.keep_checkpoints)]
  if config.best_metric:
    metric = config.best_metric
    policies.append(checkpoint_managers.BestN(
        get_metric_fn=lambda metrics: metrics[metric], reverse=config.best_mode == 'min', n=1,
        keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      create=True, preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies))
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         metrics: Optional[dict[str, float]] = None) -> None:
  """Starts an asynchronous save of `state` at `step`, with eval metrics for best-keeping.

  A write error (full disk, read-only directory) of this save or of the
  previous one, still in flight, becomes a UsageError; the checkpoints already
  written stay, and the half-written one is an orbax temporary directory that
  restores ignore.
  """
  try:
    manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics)
  except Exception as e:  # Orbax and tensorstore raise OSError, ValueError, ...
    raise _write_error(manager, e) from None


def finish(manager: ocp.CheckpointManager) -> None:
  """Waits for the last asynchronous save and closes `manager`."""
  try:
    manager.wait_until_finished()
  except Exception as e:
    raise _write_error(manager, e) from None
  manager.close()


def _write_error(manager: ocp.CheckpointManager, error: Exception) -> UsageError:
  message = str(error).splitlines()[0] if str(error) else type(error).__name__
  # Tensorstore wraps the OS error: '... Failed to write N bytes to file 8: File too large [os_error_code=...]'.
  found = re.search(r': ([^:\[]+?) \[os_error_code', message)
  reason = found.group(1) if found else message[:300]
  return UsageError(f'Cannot write a checkpoint to {manager.directory}: {reason}. Free disk space or '
                    'choose another --workdir; the checkpoints already written are kept.')


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> Optional[Any]:
  """The newest readable state, laid out like `abstract_state` (shapes and shardings), or None.

  Restoring against the abstract state keeps optax's state types and places
  every array directly with its target sharding, whatever the device count
  the checkpoint was written with. Damaged checkpoints are set aside.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # Orbax raises many types for damaged files.
      reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
      _set_aside(manager, step)
      print(f'Checkpoint at step {step} is damaged ({reason}); set aside, trying the previous one.',
            flush=True)
  return None


def _set_aside(manager: ocp.CheckpointManager, step: int) -> None:
  """Moves a damaged checkpoint out of the manager's directory (process 0) and rescans."""
  source = os.path.join(str(manager.directory), str(step))
  if jax.process_index() == 0 and os.path.exists(source):
    target_dir = os.path.join(os.path.dirname(str(manager.directory)), 'corrupt_checkpoints')
    os.makedirs(target_dir, exist_ok=True)
    shutil.move(source, os.path.join(target_dir, f'{step}'))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f'set_aside_{step}')
  manager.reload()


def _lookup(tree: dict, dotted: str) -> Any:
  """The value at `dotted` in a config's JSON form; None where a config.json (e.g. an older one) lacks it."""
  for key in dotted.split('.'):
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _state_defining(config_json: dict, key: str) -> Any:
  """`_lookup`, with the model's compute-only fields (COMPUTE_ONLY_MODEL_KEYS) left out of 'model'."""
  value = _lookup(config_json, key)
  if key == 'model' and isinstance(value, dict):
    value = {k: v for k, v in value.items() if k not in COMPUTE_ONLY_MODEL_KEYS}
  return value


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir/checkpoints` holds at least one finished step directory."""
  directory = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def check_workdir(workdir: str, config: ml_collections.ConfigDict, abstract_state: Any = None) -> None:
  """Fails, before anything is written, if `workdir` cannot be used for this config.

  A workdir must be writable, have room for two checkpoints of
  `abstract_state` (one being written while the previous is kept), and if it
  already holds checkpoints they must come from the same model (same
  MODEL_KEYS in its config.json).
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UsageError(f'--workdir {workdir} is a file, not a directory; choose another path.')
  probe_dir = workdir if os.path.isdir(workdir) else os.path.dirname(os.path.abspath(workdir))
  while not os.path.exists(probe_dir):
    probe_dir = os.path.dirname(probe_dir)
  try:
    with tempfile.TemporaryFile(dir=probe_dir):
      pass
  except OSError as e:
    raise UsageError(f'--workdir {workdir} is not writable ({e.strerror}); choose a writable '
                     'directory with free space.') from None
  if abstract_state is not None:
    needed = 2 * sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
    free = shutil.disk_usage(probe_dir).free
    if free < needed:
      raise UsageError(f'--workdir {workdir} has {free / 2**20:,.1f} MiB free, but two checkpoints of '
                       f'this model need {needed / 2**20:,.1f} MiB; free space or choose another '
                       '--workdir.')

  saved_path = os.path.join(workdir, 'config.json')
  if not (has_checkpoints(workdir) and os.path.exists(saved_path)):
    return
  with open(saved_path) as f:
    saved = json.load(f)
  current = json.loads(config.to_json_best_effort())
  different = [key for key in MODEL_KEYS if _state_defining(saved, key) != _state_defining(current, key)]
  if different:
    details = '; '.join(f'{k}: saved {_state_defining(saved, k)!r}, now {_state_defining(current, k)!r}'
                        for k in different)
    raise UsageError(f'--workdir {workdir} holds checkpoints of a different model ({details}). '
                     'Use a new --workdir, or the config that wrote it.')
