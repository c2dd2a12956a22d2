"""One command for every tool: `vit-jax COMMAND [FLAGS]` (also `python -m vit_jax COMMAND`).

Each command lives in its own module and is imported only when it runs, so
`vit-jax --help` starts in a blink and a command loads only what it needs.
Every command treats a mistake the same way: one `error: ...` line on stderr
and exit code 2, before anything is written.
"""

import importlib
import os
import re
import sys
from typing import NamedTuple, Optional


class Command(NamedTuple):
  module: str  # Module holding `main(argv)` (and, for flag-based commands, `define_flags()`).
  summary: str
  absl: bool  # Flags through absl (and ml_collections' --config); else the module parses argv itself.
  retain_host_memory: bool = False  # Runs JAX programs over and over on the host: see vit_jax/cpu/hostmem.py.


COMMANDS = {
    'train': Command('vit_jax.main', 'train or resume a run: --config FILE --workdir DIR', True, True),
    'predict': Command('vit_jax.tools.predict', 'top-k classes (and attention maps) of image files', True, True),
    'evaluate': Command('vit_jax.tools.evaluate', 'accuracy, confusion matrix and mistakes on the eval split',
                        True, True),
    'export': Command('vit_jax.tools.export', "a run's parameters as a published-layout .npz + JSON", True),
    'plots': Command('vit_jax.tools.plots', 'training curves of one or several workdirs', True),
    'summary': Command('vit_jax.tools.summary', 'parameters per module and GFLOPs of a variant', False),
    'memory': Command('vit_jax.tools.memory', 'per-device memory of a config, from shapes alone', True),
    'sweep': Command('vit_jax.sweeps.command', 'run an ablation sweep file and report it', False),
    'benchmark': Command('vit_jax.bench.benchmark', 'train/inference images/s and MFU of a variant', False,
                         True),
    'benchmark-timm': Command('vit_jax.bench.timm', 'the benchmark side by side with timm', False),
    'input-benchmark': Command('vit_jax.bench.input', 'input pipeline images/s against the train step',
                               True, True),
}


def usage() -> str:
  width = max(map(len, COMMANDS))
  rows = '\n'.join(f'  {name:<{width}}  {c.summary}' for name, c in COMMANDS.items())
  return (f'usage: vit-jax COMMAND [FLAGS]   (or: python -m vit_jax COMMAND [FLAGS])\n\ncommands:\n{rows}\n\n'
          'vit-jax COMMAND --help lists the flags of one command.')


def fail(message: str) -> None:
  """The one way every command reports a usage mistake: a line on stderr, exit code 2."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def flag_error_text(e: Exception) -> str:
  """One line for a bad flag or config override, with a suggestion for a misspelt config key.

  A misspelt key surfaces from ml_collections as an AttributeError or
  KeyError that carries a "Did you mean" suggestion; a bad value as a flags
  error.
  """
  text = ' '.join(str(e).replace('\\n', ' ').replace("\\'", "'").split())
  if isinstance(e, (AttributeError, KeyError)):
    key = re.search(r"'([^']+)'", text)
    guess = re.search(r'Did you mean "([^"]+)"', text)
    text = (f'unknown config key {key.group(1) if key else text!r}'
            + (f' (did you mean "{guess.group(1)}"?)' if guess else '')
            + '; every key is declared in vit_jax/config/defaults.py')
  return text


def parse_absl_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every bad flag or config override as one `error:` line, exit 2."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    fail(flag_error_text(e))
  except SystemExit:
    raise
  except Exception as e:  # A config file that does not load: its own error, in one line.
    fail(f'{type(e).__name__}: {" ".join(str(e).split())[:500]}')


def run_absl(module, prog: str, argv: list[str]) -> int:
  """Defines the module's flags, parses `argv` and runs `module.main`, with UsageError as one line."""
  from absl import app, flags, logging

  from vit_jax.errors import UsageError

  module.define_flags()

  def main(args: list[str]) -> None:
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)  # Orbax and tfds are chatty at INFO.
    try:
      module.main(args)
    except UsageError as e:
      fail(str(e))

  app.run(main, argv=[prog] + argv, flags_parser=parse_absl_flags)
  return 0


def run(name: str, argv: list[str]) -> int:
  """Runs command `name` with the arguments after it; returns its exit code."""
  if name not in COMMANDS:
    fail(f'unknown command {name!r}; commands: {", ".join(COMMANDS)} (vit-jax --help).')
  command = COMMANDS[name]
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow's C++ start-up lines.
  if command.retain_host_memory and '--help' not in argv:
    from vit_jax.cpu import hostmem
    hostmem.retain_freed_memory()  # Before JAX starts.
  module = importlib.import_module(command.module)
  if name == 'memory':
    module.simulate_devices(argv)  # Before JAX starts its backends.
  if command.absl:
    return run_absl(module, f'vit-jax {name}', argv)
  return int(module.main(argv) or 0)


def main(argv: Optional[list[str]] = None) -> int:
  """The `vit-jax` entry point."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] in ('-h', '--help', 'help'):
    print(usage())
    return 0 if argv else 2
  return run(argv[0], argv[1:])
