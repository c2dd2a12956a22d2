"""A workdir's record of its config: `config.json`, and `config_history.jsonl` of the changes made on resuming.

Reads and writes only these two files; the checkpoints are manager.py's.
"""

import datetime
import json
from typing import Any, Optional

import ml_collections

from vit_jax import storage


def _flat(tree: Any, prefix: str = '') -> dict[str, Any]:
  """A config's JSON form as {'optimizer.grad_clip_norm': 1.0, ...}."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  flat = {}
  for key, value in tree.items():
    flat.update(_flat(value, f'{prefix}.{key}' if prefix else key))
  return flat


def saved_config(workdir: str) -> Optional[dict]:
  """The JSON form of `workdir/config.json`, or None when there is none (`workdir` may be a gs:// URL)."""
  try:
    return json.loads(storage.read_text(storage.join(workdir, 'config.json')))
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
    return None


def config_changes(saved: Optional[dict], config: ml_collections.ConfigDict,
                   added: bool = False) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (saved value, new value)} of every key where `config` differs from `saved` (config.json).

  Keys that only one of them has (a config.json written before a key was
  added) count only with `added`, as (None, value) or (value, None).
  """
  old, new = _flat(saved or {}), _flat(json.loads(config.to_json_best_effort()))
  keys = set(old) | set(new) if added else set(old) & set(new)
  return {k: (old.get(k), new.get(k)) for k in sorted(keys) if old.get(k) != new.get(k)}


def format_changes(changes: dict[str, tuple[Any, Any]], limit: int = 8) -> str:
  """'optimizer.grad_clip_norm 1.0 -> 0.0, ...' (at most `limit` keys, then a count)."""
  shown = [f'{k} {old!r} -> {new!r}' for k, (old, new) in list(changes.items())[:limit]]
  if len(changes) > limit:
    shown.append(f'and {len(changes) - limit} more')
  return ', '.join(shown)


def record_config(workdir: str, config: ml_collections.ConfigDict, step: int) -> None:
  """Keeps `workdir/config.json` the config that the run's checkpoints are trained with (process 0).

  A new run writes it. A run resumed at `step` with other values (a longer
  schedule, another learning rate, remat, ...) rewrites it and appends
  `{"step", "time", "changes": {key: [old, new]}}` to config_history.jsonl,
  so the record says which steps were trained with which values.
  """
  saved = saved_config(workdir)
  changes = config_changes(saved, config) if saved is not None else {}
  if saved is not None and not changes:
    return
  if changes:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    row = {'step': int(step), 'time': now,
           'changes': {k: [old, new] for k, (old, new) in changes.items()}}
    storage.append_text(storage.join(workdir, 'config_history.jsonl'), json.dumps(row) + '\n')
  # Atomic (storage.write_text): a failed write keeps the previous file.
  storage.write_text(storage.join(workdir, 'config.json'), config.to_json_best_effort(indent=2, sort_keys=True) + '\n')
