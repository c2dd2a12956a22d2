"""The console shows our lines; what the libraries underneath log goes to a log file.

Orbax, tfds, TensorStore's asyncio tasks and JAX log warnings and tracebacks
that say nothing a user can act on (`Variant folder ... has no
dataset_info.json` for a dataset that is simply not prepared, thousands of
`Task exception was never retrieved` lines for a damaged checkpoint that is
set aside). Where they matter, our own line says what they meant (the
dataset error, `Checkpoint at step N is damaged ...; set aside`). So every log
record that does not come from vit_jax itself, and Python warnings raised
outside it, are written to `log_path(command)` instead of the console;
`--verbose` (or `VIT_JAX_VERBOSE=1` for the commands without absl flags) shows
them as before. The file is created only when there is something to write.
"""

import logging
import os

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def log_dir() -> str:
  """$VIT_JAX_LOG_DIR, else `vit_jax/logs` in the user's cache directory."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.environ.get('VIT_JAX_LOG_DIR') or os.path.join(base, 'vit_jax', 'logs')


def log_path(command: str) -> str:
  """The file that the libraries' log lines of `command` ('vit-jax train') go to."""
  return os.path.join(log_dir(), command.replace(' ', '-') + '.log')


class _OursOnly(logging.Filter):
  """Passes vit_jax's own records; writes every other one to the log file instead."""

  def __init__(self, path: str):
    super().__init__()
    self.path = path
    self.handler = None

  def filter(self, record: logging.LogRecord) -> bool:
    if record.pathname.startswith(_PACKAGE):
      return True
    if getattr(record, 'vit_jax_logged', False):  # Seen by another handler of the same logger chain.
      return False
    record.vit_jax_logged = True
    try:
      if self.handler is None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.handler = logging.FileHandler(self.path, delay=True)
        self.handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s %(filename)s:'
                                                    '%(lineno)d] %(message)s'))
      self.handler.emit(record)
    except OSError:  # No log file (a read-only home): the line is dropped, never shown.
      pass
    return False


_installed: list[tuple[logging.Handler, logging.Filter]] = []


def keep_to_our_lines(command: str, verbose: bool = False) -> None:
  """Sends the libraries' log records (and their Python warnings) of this process to `log_path(command)`
  rather than the console, from now on; with `verbose`, shows them. Safe to call again (each command
  run in one process replaces the previous setting)."""
  from absl import logging as absl_logging

  for handler, old in _installed:
    handler.removeFilter(old)
    if old.handler is not None:
      old.handler.close()
  _installed.clear()
  logging.captureWarnings(not verbose)  # warnings.warn -> the 'py.warnings' logger -> the filter.
  if verbose:
    return
  ours = _OursOnly(log_path(command))
  # absl's handler (on the root logger once app.run has run) and Python's last resort (before).
  handlers = set(logging.root.handlers) | {absl_logging.get_absl_handler(), logging.lastResort}
  for handler in handlers - {None}:
    handler.addFilter(ours)
    _installed.append((handler, ours))
