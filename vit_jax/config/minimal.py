"""The two ml_collections names that `defaults.get_config` uses, for hosts without ml_collections.

An accelerator image often carries jax, flax, optax and orbax and nothing
else. The train step, the benchmark and `vit-jax selfcheck` read a config
only as `config.key` and `config['key']`, so there `defaults.get_config`
builds its tree from this module instead: nested attribute dicts, unlocked,
without ml_collections' type checks. Config files and `--config.KEY=VALUE`
overrides (the launcher and the absl commands) need the real package.
"""

from typing import Any, Optional


def FieldReference(default: Any, field_type: Optional[type] = None) -> Any:  # noqa: N802 (ml_collections' name)
  """The value itself: without ml_collections nothing refers to a field, so there is nothing to resolve."""
  del field_type
  return default


class ConfigDict:
  """Attribute and item access over a dict of fields, as `ml_collections.ConfigDict` reads."""

  def __init__(self, fields: Optional[dict[str, Any]] = None):
    object.__setattr__(self, '_fields', dict(fields or {}))

  def __getattr__(self, name: str) -> Any:
    try:
      return self._fields[name]
    except KeyError:
      raise AttributeError(f'config has no key {name!r}; keys: {", ".join(self._fields)}') from None

  def __setattr__(self, name: str, value: Any) -> None:
    self._fields[name] = value

  def __getitem__(self, name: str) -> Any:
    return self._fields[name]

  def __setitem__(self, name: str, value: Any) -> None:
    self._fields[name] = value

  def __contains__(self, name: str) -> bool:
    return name in self._fields

  def keys(self):
    return self._fields.keys()

  def items(self):
    return self._fields.items()

  def to_dict(self) -> dict[str, Any]:
    return {k: v.to_dict() if isinstance(v, ConfigDict) else v for k, v in self._fields.items()}

  def lock(self) -> 'ConfigDict':
    return self

  def __repr__(self) -> str:
    return f'ConfigDict({self.to_dict()!r})'
