"""The orbax checkpoint manager: save the train state, resume from the latest."""

import os
from typing import Any, Optional

import orbax.checkpoint as ocp


def create_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """An orbax manager over `workdir/checkpoints`, keeping the latest `keep` steps.

  Saves are asynchronous: `save` returns once the state is copied to host, and
  the write to disk overlaps the next training steps.
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  manager.save(step, args=ocp.args.StandardSave(state))


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> Optional[Any]:
  """The latest saved state, laid out like `abstract_state` (shapes and shardings), or None.

  Restoring against the abstract state keeps optax's state types and places
  every array directly with its target sharding.
  """
  step = manager.latest_step()
  if step is None:
    return None
  return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
