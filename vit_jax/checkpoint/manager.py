"""The orbax checkpoint manager: save the train state, resume from the newest valid one.

Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a crash mid-write never leaves a half checkpoint under its step
name. Before resuming, each checkpoint's saved tree (orbax's metadata: the
path, shape and dtype of every array) is compared with the train state the
new config builds:
- a checkpoint whose files read but do not make a checkpoint (truncated,
  garbled or missing files) is damaged: it is moved to
  `workdir/corrupt_checkpoints/` and the next older one is used; when every
  one is damaged the run stops (`discard_damaged` starts over deliberately);
- a checkpoint that cannot be read now (I/O or permission errors, a missing
  directory, out of memory: vit_jax/checkpoint/faults.py) stops the run with
  a CheckpointUnavailable error before anything is moved or written;
- a readable checkpoint whose tree or shapes differ was written by a config
  the new one cannot continue (another optimizer chain, model size, number of
  classes): that is a UsageError naming the config keys that changed, raised
  before anything is written.
Every process takes the same decision: the gravest verdict of any process.
"""

import json
import re
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from vit_jax import storage
from vit_jax.checkpoint import faults
from vit_jax.checkpoint.record import config_changes, format_changes, saved_config
from vit_jax.errors import UsageError

# Verdicts on a checkpoint, as small integers so that processes can agree on them, graver ones higher.
_FITS, _INCOMPATIBLE, _DAMAGED, _UNAVAILABLE = 0, 1, 2, 3


def _save_each_array_from_one_replica_on_cpu() -> None:
  """On the CPU backend, has orbax copy each replicated array to host from one replica.

  Orbax's default (off only for GPUs) splits every replicated array into one
  slice per replica, so that devices copy to host in parallel. CPU devices
  share the host's memory, so there it gains nothing and costs one compiled
  slice per array shape and replica: 7 s at the first save of an 8-device
  process (the tiny hybrid), 1,590 compilations. Orbax takes the setting from
  its type handler registry, hence the registration (once per process).
  """
  global _one_replica_registered
  if _one_replica_registered or jax.default_backend() != 'cpu':
    return
  from absl import logging  # Orbax warns of every override of a type handler; this one is meant.
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
  finally:
    logging.set_verbosity(verbosity)
  _one_replica_registered = True


_one_replica_registered = False


def create_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """An orbax manager over `workdir/checkpoints`.

  Keeps the latest `config.keep_checkpoints` steps and, if
  `config.best_metric` is set, also the one with the best value of that eval
  metric, whose metrics orbax then writes beside each checkpoint (so that the
  best is still known after a resume, and `--step best` can find it). Saves
  are asynchronous: `save` returns once the state is copied to host and the
  write to disk overlaps the next training steps.
  """
  policies = [checkpoint_managers.LatestN(n=config.keep_checkpoints)]
  best = {}
  if config.best_metric:
    metric = config.best_metric
    get_metric = lambda metrics: metrics[metric]  # noqa: E731
    policies.append(checkpoint_managers.BestN(
        get_metric_fn=get_metric, reverse=config.best_mode == 'min', n=1,
        keep_checkpoints_without_metrics=False))
    best = dict(best_fn=get_metric, best_mode=config.best_mode)  # best_fn: metrics are written to disk.
  _save_each_array_from_one_replica_on_cpu()
  options = ocp.CheckpointManagerOptions(
      create=True, preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies), **best)
  directory = storage.absolute(storage.join(workdir, 'checkpoints'))
  storage.path(directory)  # A gs:// URL: orbax's own file operations go through gcsfs too (storage.py).
  return ocp.CheckpointManager(directory, options=options)


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


def _close_after_error(manager: ocp.CheckpointManager) -> None:
  """Closes `manager` after a failed write, so that its writer threads end before the error is shown."""
  try:
    manager.close()
  except Exception:  # The same write error again: the one being reported.
    pass


def finish(manager: ocp.CheckpointManager) -> None:
  """Waits for the last asynchronous save and closes `manager`."""
  try:
    manager.wait_until_finished()
  except Exception as e:
    raise _write_error(manager, e) from None
  manager.close()


def _write_error(manager: ocp.CheckpointManager, error: Exception) -> UsageError:
  """The one-line error of a failed save, once the checkpoints written before it are read back."""
  _close_after_error(manager)
  text = str(error)
  # Tensorstore wraps the OS error: '... Failed to write N bytes to file 8: File too large [os_error_code=...]',
  # on the first line or a later one depending on which writer thread failed first.
  found = re.search(r': ([^:\[\n]+?) \[os_error_code', text)
  reason = found.group(1) if found else (text.splitlines()[0][:300] if text else type(error).__name__)
  if re.search(r'No space left|File too large|Disk quota', reason):
    fix = 'Free disk space or choose another --workdir'
  elif storage.is_url(manager.directory):
    fix = ('The storage server refused or failed the write after the storage library\'s retries (not the '
           'run): check the bucket\'s permissions and that it answers, then run the same command to resume')
  else:
    fix = ('The file system failed to write (not the run): check that it is mounted, writable and answering, '
           'then run the same command to resume')
  directory = str(manager.directory)
  try:
    steps = faults.list_steps(directory)
    unread = next(filter(None, (faults.unreadable(storage.join(directory, str(s))) for s in steps)), None)
  except faults.CheckpointUnavailable as e:
    steps, unread = [], str(e)
  if unread:
    kept = f'the checkpoints written before could not be read back either ({unread}): check the file system'
  elif steps:
    kept = f'the checkpoints written before (steps {", ".join(map(str, steps))}) read back intact'
  else:
    kept = 'no checkpoint was written before'
  return UsageError(f'Cannot write a checkpoint to {directory}: {reason}. {fix}; {kept}.')


def _agreed(verdict: int) -> int:
  """The gravest `verdict` of all processes, on every process: all take the same branch, and a checkpoint
  that one process cannot read now is unavailable for all (none sets aside what another could not read)."""
  if jax.process_count() == 1:
    return verdict
  from jax.experimental import multihost_utils
  return int(np.max(multihost_utils.process_allgather(np.int32(verdict))))


# --- What a checkpoint holds, and whether the new config's train state fits it. ---


def _by_path(tree: Any) -> dict[str, Any]:
  """'params/head/kernel' -> leaf for every array leaf of a state, of orbax's metadata tree or of a restore.

  Dataclass fields, namedtuple fields and dict keys all become path names,
  and empty nodes (optax's EmptyState, None) have no leaves, so a train state
  and the metadata of its checkpoint give the same paths.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path, simple=True, separator='/'): leaf for path, leaf in flat}


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {path: tuple(leaf.shape) for path, leaf in _by_path(tree).items()}


def saved_tree(step_dir: str) -> Any:
  """The tree of array metadata (shape, dtype) of the train state saved in `step_dir`.

  Reads orbax's `_METADATA` file only, no array data.
  """
  handler = ocp.PyTreeCheckpointHandler()  # The handler alone: no step-level files, no barriers.
  try:
    return handler.metadata(storage.path(step_dir) / 'default').tree
  finally:
    handler.close()


def _state_difference(saved: dict, wanted: dict) -> str:
  """A short description of how two `_shapes` maps differ; '' when they are equal."""
  parts = []
  only_saved = sorted(set(saved) - set(wanted))
  only_wanted = sorted(set(wanted) - set(saved))
  reshaped = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
  if only_saved:
    parts.append(f'{len(only_saved)} saved arrays this config has no place for, e.g. {only_saved[0]}')
  if only_wanted:
    parts.append(f'{len(only_wanted)} arrays this config needs that were not saved, e.g. {only_wanted[0]}')
  if reshaped:
    k = reshaped[0]
    parts.append(f'{len(reshaped)} arrays of another shape, e.g. {k} saved {saved[k]}, now {wanted[k]}')
  return '; '.join(parts)


def _failure(error: BaseException, step_dir: str) -> tuple[int, str]:
  """(_UNAVAILABLE or _DAMAGED, reason) of a failed read of `step_dir` (faults.py tells which)."""
  reason = faults.unavailable_reason(error, step_dir)
  return (_UNAVAILABLE, reason) if reason else (_DAMAGED, faults.first_line(error))


def _verdict(step_dir: str, abstract_state: Any) -> tuple[int, str, Any]:
  """(_FITS, '', saved tree), (_INCOMPATIBLE, difference, saved tree), or (_DAMAGED or _UNAVAILABLE,
  reason, None)."""
  try:
    saved = saved_tree(step_dir)
  except Exception as e:  # Orbax raises many types for missing or unreadable files.
    return (*_failure(e, step_dir), None)
  difference = _state_difference(_shapes(saved), _shapes(abstract_state))
  return (_INCOMPATIBLE if difference else _FITS), difference, saved


def _restore(manager: ocp.CheckpointManager, step: int, saved: Any, abstract_state: Any) -> Any:
  """The checkpoint at `step` as a state like `abstract_state`, its arrays matched by path.

  The restore target has the saved tree's own structure (so empty nodes
  that differ, e.g. a state field added since as None, do not matter), with
  the shape, dtype and sharding of `abstract_state`'s array at each path.
  """
  wanted = _by_path(abstract_state)
  target = jax.tree_util.tree_map_with_path(
      lambda path, _: wanted[jax.tree_util.keystr(path, simple=True, separator='/')], saved)
  restored = _by_path(manager.restore(step, args=ocp.args.StandardRestore(target)))
  treedef = jax.tree_util.tree_structure(abstract_state)
  return jax.tree_util.tree_unflatten(treedef, [restored[path] for path in wanted])


def _incompatible_error(workdir: str, step: int, difference: str,
                        config: Optional[ml_collections.ConfigDict]) -> UsageError:
  saved = saved_config(workdir)
  if config is None:
    changed = 'compare its config.json with this config'
  elif saved is None:
    changed = 'the workdir has no config.json to compare the config with'
  else:
    changes = config_changes(saved, config) or config_changes(saved, config, added=True)
    changed = (f'config keys changed from its config.json: {format_changes(changes)}' if changes else
               'no config key differs from its config.json, so the code that builds the train state changed')
  return UsageError(
      f'--workdir {workdir} holds checkpoints (step {step}) whose train state this config cannot continue '
      f'({difference}); {changed}. Resume with the original values, or start a new --workdir with '
      f'--config.init.path={workdir} to begin from its parameters (its classifier head starts from zeros '
      'unless you add --config.init.reset_head=False).')


def _finished_steps(directory: str) -> list[int]:
  """Steps of the finished checkpoints in `directory`, newest first (CheckpointUnavailable if it cannot be
  listed)."""
  return faults.list_steps(directory)


def _unavailable(workdir: str, step: int, reason: str) -> faults.CheckpointUnavailable:
  return faults.unavailable_error(f'the checkpoint at step {step} of --workdir {workdir}',
                                  reason or 'it could not be read on another process (see its log)')


def _stop_unless_usable(agreed: int, verdict: int, detail: str, workdir: str, step: int,
                        config: Optional[ml_collections.ConfigDict]) -> None:
  """Raises when the processes agreed that `step` cannot be read now or is of another tree.

  `verdict` and `detail` are this process's own; another process's verdict leaves no detail here."""
  if agreed == _UNAVAILABLE:
    raise _unavailable(workdir, step, detail if verdict == _UNAVAILABLE else '')
  if agreed == _INCOMPATIBLE:
    raise _incompatible_error(workdir, step, detail or 'differs on another process', config)


def check_resumable(workdir: str, config: ml_collections.ConfigDict, abstract_state: Any) -> None:
  """Fails, writing nothing, if the newest readable checkpoint of `workdir` cannot take `abstract_state`,
  or if a checkpoint it looks at cannot be read now (CheckpointUnavailable).

  Damaged checkpoints are skipped here (restore_latest sets them aside): a
  run whose latest checkpoint is damaged and whose previous one fits resumes.
  """
  directory = storage.join(workdir, 'checkpoints')
  for step in _finished_steps(directory):
    verdict, detail, _ = _verdict(storage.join(directory, str(step)), abstract_state)
    agreed = _agreed(verdict)
    _stop_unless_usable(agreed, verdict, detail, workdir, step, config)
    if agreed == _FITS:
      return


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   config: Optional[ml_collections.ConfigDict] = None,
                   discard_damaged: bool = False) -> Optional[Any]:
  """The newest readable state, laid out like `abstract_state` (shapes and shardings), or None.

  Restoring each array by its path into the abstract state keeps optax's
  state types and places every array directly with its target sharding,
  whatever the device count the checkpoint was written with. Damaged
  checkpoints newer than the one restored are set aside once it is restored.
  A checkpoint that cannot be read now is CheckpointUnavailable, raised
  before anything is moved. When every checkpoint is damaged, that is a
  UsageError, nothing moved, unless `discard_damaged`: then all are set aside
  and None is returned (the run starts over). One that is readable but of
  another tree is a UsageError (check_resumable says so earlier, before
  anything is written).
  """
  directory = str(manager.directory)
  workdir = storage.dirname(directory)
  damaged: list[tuple[int, str]] = []
  state = None
  for step in _finished_steps(directory):
    step_dir = storage.join(directory, str(step))
    verdict, reason, saved = _verdict(step_dir, abstract_state)
    agreed = _agreed(verdict)
    if agreed == _FITS:
      try:
        state = _restore(manager, step, saved, abstract_state)
      except Exception as e:  # Orbax raises many types, for damage and for faults alike.
        verdict, reason = _failure(e, step_dir)
      agreed = _agreed(verdict)
    _stop_unless_usable(agreed, verdict, reason, workdir, step, config)
    if agreed == _FITS:
      break
    state = None
    damaged.append((step, reason if verdict == _DAMAGED else 'unreadable on another process'))
  if state is None and damaged and not discard_damaged:
    listed = '; '.join(f'step {step}: {reason}' for step, reason in damaged)
    raise UsageError(
        f'Every checkpoint in {directory} is damaged ({listed}); nothing was moved. To start over from step 0 '
        'deliberately, run the same command with --discard_damaged (they are moved to '
        f'{storage.join(workdir, "corrupt_checkpoints")}).')
  for step, reason in damaged:
    _set_aside(manager, step)
    if jax.process_index() == 0:
      print(f'Checkpoint at step {step} is damaged ({reason}); set aside in corrupt_checkpoints/.', flush=True)
  return state


def _set_aside(manager: ocp.CheckpointManager, step: int) -> None:
  """Moves a damaged checkpoint out of the manager's directory (process 0) and rescans."""
  source = storage.join(str(manager.directory), str(step))
  if jax.process_index() == 0 and storage.exists(source):
    target_dir = storage.join(storage.dirname(str(manager.directory)), 'corrupt_checkpoints')
    storage.makedirs(target_dir)
    target = storage.join(target_dir, f'{step}')
    while storage.exists(target):  # Set aside before: keep both.
      target += '+'
    # In a bucket the commit marker goes first: a move cut short leaves no finished-looking step behind.
    storage.move_tree(source, target, last_first=faults.COMMIT_FILE)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f'set_aside_{step}')
  manager.reload()


def best_step(workdir: str, metric: str, mode: str) -> Optional[int]:
  """The kept checkpoint step with the best recorded `metric` ('max' or 'min' `mode`), or None.

  Reads the eval metrics that orbax writes beside each checkpoint (when the
  run has a config.best_metric); checkpoints saved without eval have none.
  Ties go to the later step. Reads only.
  """
  directory = storage.absolute(storage.join(workdir, 'checkpoints'))
  values = {}
  for step in _finished_steps(directory):
    path = storage.join(directory, str(step), 'metrics', 'metrics')
    try:
      text = storage.read_text(path)
    except FileNotFoundError:  # Saved without eval.
      continue
    except Exception as e:  # OSError locally; gcsfs' errors in a bucket.
      raise faults.unavailable_error(f'the metrics of checkpoint {step}', f'{storage.describe_error(e)} on {path}',
                                     reader=True) from None
    try:
      metrics = json.loads(text)
    except ValueError as e:
      raise UsageError(f'--step best: the metrics of checkpoint {step} do not parse ({e}; {path}): that '
                       'checkpoint is damaged; pass --step with a step number instead.') from None
    if isinstance(metrics, dict) and metric in metrics:
      values[step] = float(metrics[metric])
  if not values:
    return None
  sign = 1 if mode == 'max' else -1
  return max(values, key=lambda step: (sign * values[step], step))
