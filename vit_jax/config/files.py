"""Reading configs: a `configs/*.py` file (optionally `FILE.py:ARG`), or the JSON a workdir or an export wrote.

Every way a config file can be wrong (missing, not importable, no
`get_config`, a `get_config` that raises, a bad `:ARG`, broken JSON) is a
UsageError naming the file and the problem, so each command reports it as
one line. `define_config_flag` gives absl commands a `--config` flag that
loads through here and still takes `--config.KEY=VALUE` overrides.
"""

import difflib
import importlib.util
import inspect
import json
import os
import re
import sys
from typing import Any, Optional

import ml_collections

from vit_jax import storage
from vit_jax.config import defaults
from vit_jax.errors import UsageError

KINDS = ('a configs/*.py file (FILE.py:ARG when its get_config takes one), a workdir config.json or the .json '
         'written by export')


def _one_line(e: BaseException, limit: int = 300) -> str:
  text = ' '.join(str(e).split())
  return f'{type(e).__name__}: {text[:limit]}' if text else type(e).__name__


def split_argument(path: str) -> tuple[str, Optional[str]]:
  """(file, argument) of `FILE.py:ARG`, split at its first colon as ml_collections does; argument None if none
  (a gs:// URL is a file, never split)."""
  if storage.is_url(path) or os.path.isfile(path) or ':' not in path:
    return path, None
  file, argument = path.split(':', 1)
  return file, argument


def _missing(file: str) -> UsageError:
  if os.path.isdir(file):
    inside = os.path.join(file, 'config.json')
    hint = f' (its config is {inside!r})' if os.path.isfile(inside) else ''
    return UsageError(f'Config {file!r} is a folder{hint}; pass {KINDS}.')
  folder = os.path.dirname(file) or '.'
  names = sorted(n for n in os.listdir(folder) if n.endswith(('.py', '.json'))) if os.path.isdir(folder) else []
  close = difflib.get_close_matches(os.path.basename(file), names, n=1)
  hint = f' (did you mean {os.path.join(os.path.dirname(file), close[0])!r}?)' if close else ''
  return UsageError(f'Config file {file!r} does not exist{hint}; pass {KINDS}.')


def package_root(file: str) -> None:
  """Puts the folder above the config's package on sys.path, so that it can import its siblings.

  `configs/vit_l16.py` builds on `from configs import vit_b16`: under `python -m` the working
  directory is on sys.path and that import works from the checkout's root, but the `vit-jax`
  script's sys.path holds only its own folder. A config file in a folder with an `__init__.py` is
  part of that package wherever the command runs from.
  """
  folder = os.path.dirname(os.path.abspath(file))
  if os.path.isfile(os.path.join(folder, '__init__.py')):
    root = os.path.dirname(folder)
    if root not in sys.path:
      sys.path.append(root)  # Last: the installed vit_jax wins over any copy next to the configs.


def _from_python(file: str, argument: Optional[str]) -> Any:
  name = 'vit_jax_config_' + re.sub(r'\W', '_', os.path.splitext(os.path.basename(file))[0])
  spec = importlib.util.spec_from_file_location(name, file)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # As an import would: dataclasses and pickling look a module up here.
  package_root(file)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UsageError(f'Config file {file!r} does not parse: {e.msg} (line {e.lineno}).') from None
  except Exception as e:  # Whatever its imports or top-level code raise.
    raise UsageError(f'Config file {file!r} does not import: {_one_line(e)}.') from None
  get_config = getattr(module, 'get_config', None)
  if not callable(get_config):
    raise UsageError(f'Config file {file!r} has no get_config() function; a config file defines '
                     'get_config() returning an ml_collections.ConfigDict (see configs/quickstart.py).')
  args = () if argument is None else (argument,)
  try:
    inspect.signature(get_config).bind(*args)
  except TypeError:
    if argument is None:
      raise UsageError(f'Config file {file!r}: get_config() needs an argument; pass {file}:ARG.') from None
    raise UsageError(f'Config file {file!r} takes no ":ARG" (got {argument!r}); pass {file} '
                     'without it.') from None
  try:
    config = get_config(*args)
  except UsageError as e:
    raise UsageError(f'Config file {file!r}: {e}') from None
  except Exception as e:  # The config's own mistake, in one line.
    call = f'get_config({argument!r})' if args else 'get_config()'
    raise UsageError(f'Config file {file!r}: {call} raised {_one_line(e)}.') from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise UsageError(f'Config file {file!r}: get_config() returned {type(config).__name__}, not an '
                     'ml_collections.ConfigDict.')
  return config


# (group, key, value): runs saved before `config.group.key` existed were made with this value, which is
# not today's default. model.gelu: the encoder computed exact GELU until the tanh default of the
# published checkpoints came.
SAVED_BEFORE_KEY_EXISTED = (('model', 'gelu', 'exact'),)


def _from_json(file: str) -> ml_collections.ConfigDict:
  try:
    saved = json.loads(storage.read_text(file))  # A workdir's config.json may be in a bucket.
  except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError.
    raise UsageError(f'Config file {file!r} is neither a .py file nor valid JSON ({_one_line(e, 120)}); '
                     f'pass {KINDS}.') from None
  if not isinstance(saved, dict):
    raise UsageError(f'Config file {file!r} holds a JSON {type(saved).__name__}, not a config object.')
  saved = saved.get('config', saved)  # An export's JSON nests the config next to class names.
  config = defaults.get_config()
  # Keys whose default changed since runs were first saved: a saved run without the key was made with
  # the old value, and must be read back with it.
  for group, key, before in SAVED_BEFORE_KEY_EXISTED:
    if isinstance(saved.get(group), dict) and key not in saved[group]:
      saved = {**saved, group: {**saved[group], key: before}}
  try:
    config.update(saved)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise UsageError(f'Config file {file!r} does not fit vit_jax/config/defaults.py: {_one_line(e)}.') from None
  return config


def load_config(path: str) -> ml_collections.ConfigDict:
  """A locked config from a run's `config.json` (or an export's JSON), or a `configs/*.py` file.

  A `.py` file may be followed by `:ARG`, passed to its `get_config`
  (`configs/image_folder.py:PATH`). JSON values are laid over
  `vit_jax.config.defaults`, so keys added since the run was trained take
  their defaults. Raises UsageError, naming the file, for every bad file.
  """
  file, argument = split_argument(path)
  if storage.is_url(file):
    if not storage.isfile(file):
      raise UsageError(f'Config file {file!r} does not exist; pass {KINDS}.')
  elif not os.path.isfile(file):
    raise _missing(file)
  if file.endswith('.py'):
    config = _from_python(file, argument)
  elif argument is not None:
    raise UsageError(f'{path!r}: only a .py config file takes ":ARG"; pass {file!r} alone.')
  else:
    config = _from_json(file)
  config.lock()
  return config


def unknown_key(config: ml_collections.ConfigDict, key: str) -> Optional[str]:
  """None if the dotted `key` is in `config`; else the one-line error, with the closest key as a hint."""
  node, done, parts = config, [], key.split('.')
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict):
      return f'config.{".".join(done)} is a value, not a group of keys, so config.{key} does not exist'
    if part not in node:
      close = difflib.get_close_matches(part, list(node.keys()), n=1)
      if close and not unknown_key(config, '.'.join(done + close + parts[i + 1:])):
        close += parts[i + 1:]  # `modle.variant` -> `model.variant`.
      guess = f' (did you mean "{".".join(done + close)}"?)' if close else ''
      return (f'unknown config key {key!r}{guess}; every key is declared in '
              'vit_jax/config/defaults.py')
    node = node[part]
    done.append(part)
  return None


def define_config_flag(help_string: str) -> None:
  """Defines `--config FILE` (absl), loaded by `load_config`, with `--config.KEY=VALUE` overrides.

  ml_collections' config flag, with its file loader replaced: a `.json`
  workdir config is accepted too, and a bad file is a UsageError.
  """
  from absl import flags
  from ml_collections import config_flags

  class Parser(flags.ArgumentParser):

    def parse(self, argument: str) -> ml_collections.ConfigDict:
      return load_config(argument)

    def flag_type(self) -> str:
      return 'config object'

  config_flags.DEFINE_config_file('config', None, help_string, lock_config=True)
  flags.FLAGS['config'].parser = Parser()
