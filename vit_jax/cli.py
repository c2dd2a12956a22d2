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
import tempfile
from typing import Any, NamedTuple, Optional


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
    'fewshot': Command('vit_jax.tools.fewshot', 'few-shot linear accuracy (1/5/10/25 shots) on a dataset', True, True),
    'analyze': Command('vit_jax.tools.analyze', "the paper's Figure 7: filters, posemb similarity, attention "
                       'distance', True, True),
    'summary': Command('vit_jax.tools.summary', 'parameters per module and GFLOPs of a variant', False),
    'devices': Command('vit_jax.tools.devices', 'the devices JAX sees and the attention it runs there', False),
    'selfcheck': Command('vit_jax.tools.selfcheck', 'after installing: train a few steps every way on the '
                         'devices JAX sees and check that they agree', False, True),
    'memory': Command('vit_jax.tools.memory', 'per-device memory of a config, from shapes alone', True),
    'sweep': Command('vit_jax.sweeps.command', 'run an ablation sweep file and report it', False),
    'benchmark': Command('vit_jax.bench.benchmark', 'train/inference images/s and MFU of a variant', False,
                         True),
    'benchmark-timm': Command('vit_jax.bench.side_by_side', 'the benchmark side by side with timm', False),
    'prepare': Command('vit_jax.tools.prepare', 'download and prepare a tfds dataset once, for training', False),
    'input-benchmark': Command('vit_jax.bench.input', 'input pipeline images/s against the train step',
                               True, True),
}


# Commands whose work loads TensorFlow (the data pipeline, image decoding): it is imported first, with
# its C++ start-up lines kept off the console.
LOADS_TENSORFLOW = frozenset({'train', 'predict', 'evaluate', 'export', 'fewshot', 'analyze',
                              'input-benchmark', 'prepare'})
# Commands that keep their compiled programs in JAX's persistent compilation cache, so that running one
# again on the same model skips XLA's compilation. Not the benchmarks: they report compile times.
USES_COMPILATION_CACHE = frozenset({'train', 'predict', 'evaluate', 'fewshot', 'analyze', 'memory'})
# What TensorFlow's C++ code prints while it is imported, before its logging is set up: absl's C++
# log writes these to stderr whatever TF_CPP_MIN_LOG_LEVEL says.
TENSORFLOW_STARTUP_LINES = ('All log messages before absl::InitializeLog', 'oneDNN custom operations are on',
                            'cpu_feature_guard.cc', 'To enable the following instructions')


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
  required = re.search(r'Flag --(\S+) must have a value other than None', text)
  if required:
    text = f'--{required.group(1)} is required'
  if isinstance(e, (AttributeError, KeyError)):
    key = re.search(r"'([^']+)'", text)
    guess = re.search(r'Did you mean "([^"]+)"', text)
    text = (f'unknown config key {key.group(1) if key else text!r}'
            + (f' (did you mean "{guess.group(1)}"?)' if guess else '')
            + '; every key is declared in vit_jax/config/defaults.py')
  return text


def unknown_override(argv: list[str]) -> Optional[str]:
  """The error of the first --config.KEY in `argv` that the --config file lacks, with its full dotted key."""
  from vit_jax.config import files
  from vit_jax.errors import UsageError

  paths = [argv[i + 1] if a == '--config' and i + 1 < len(argv) else a.split('=', 1)[1]
           for i, a in enumerate(argv) if a == '--config' or a.startswith('--config=')]
  try:
    config = files.load_config(paths[-1]) if paths else None
  except UsageError:
    return None
  keys = [m.group(1) for m in map(re.compile(r'--?(?:no)?config\.([\w.]+)').match, argv) if m]
  return next(filter(None, (files.unknown_key(config, key) for key in keys)), None) if config else None


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow with its C++ start-up lines filtered out of stderr; every other line passes."""
  if 'tensorflow' in sys.modules:
    return
  sys.stderr.flush()
  saved = os.dup(2)
  # TensorFlow imports Keras at start-up (and through it scikit-learn and matplotlib.pyplot) only to
  # register Keras optimizers for loading SavedModels that hold them, and skips it when Keras does not
  # import. No command uses Keras: blocking it for this import saves about a second of every start.
  # Afterwards Keras imports as usual.
  block_keras = 'keras' not in sys.modules
  if block_keras:
    sys.modules['keras'] = None
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)  # The C++ code writes to file descriptor 2, not to sys.stderr.
    try:
      import tensorflow  # noqa: F401
    except ImportError:  # An accelerator host without TensorFlow: the model and train step need none.
      pass
    finally:
      if block_keras:
        del sys.modules['keras']
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode(errors='replace').splitlines(keepends=True):
        if not any(noise in line for noise in TENSORFLOW_STARTUP_LINES):
          sys.stderr.write(line)


def compilation_cache_dir() -> str:
  """Where compiled programs are kept: $VIT_JAX_COMPILATION_CACHE_DIR, else the user's cache directory."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.environ.get('VIT_JAX_COMPILATION_CACHE_DIR') or os.path.join(base, 'vit_jax', 'jax_cache')


def enable_compilation_cache(directory: str) -> None:
  """Turns on JAX's persistent compilation cache in `directory` (skipped, with a warning, if unwritable)."""
  import jax
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    print(f'warning: no compilation cache ({e}); set VIT_JAX_COMPILATION_CACHE_DIR to a writable '
          'directory, or VIT_JAX_COMPILATION_CACHE=0.', file=sys.stderr)
    return
  jax.config.update('jax_compilation_cache_dir', directory)
  # JAX's default keeps only programs that took over 1 s to compile; predict's forward pass of a small
  # model compiles faster than that and is still worth keeping.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.1)


HELP_FLAGS = frozenset({'-h', '--help', '-?', '--helpshort'})


def command_help(module, prog: str, names: list[str]) -> str:
  """`--help` of an absl command: its docstring and its own flags (absl's would show neither)."""
  from absl import flags
  lines = [(module.__doc__ or prog).strip(), '', f'flags of {prog}:']
  for name in names:
    flag = flags.FLAGS[name]
    default = '' if flag.default is None else f' (default: {flag.default_as_str})'
    text = f'--{"[no]" if flag.boolean else ""}{name}: {flag.help}{default}'
    lines.append(flags.text_wrap(text, indent='    ', firstline_indent='  '))
  if 'config' in names and flags.FLAGS['config'].flag_type() == 'config object':  # predict's is a path.
    lines.append('  --config.KEY=VALUE: sets one key of the config; every key is declared in '
                 'vit_jax/config/defaults.py')
  return '\n'.join(lines)


def parse_absl_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every bad flag or config override as one `error:` line, exit 2."""
  from absl import flags

  from vit_jax.errors import UsageError
  try:
    return flags.FLAGS(argv)
  except UsageError as e:  # A --config file that does not load (vit_jax.config.files).
    fail(str(e))
  except (AttributeError, KeyError) as e:  # A misspelt --config.KEY.
    fail(unknown_override(argv[1:]) or flag_error_text(e))
  except flags.Error as e:
    fail(f'{flag_error_text(e)} ({argv[0]} --help lists the flags)')
  except (TypeError, ValueError) as e:
    fail(flag_error_text(e))
  except SystemExit:
    raise
  except Exception as e:  # A config file that does not load: its own error, in one line.
    fail(f'{type(e).__name__}: {" ".join(str(e).split())[:500]}')


def run_absl(module, prog: str, argv: list[str], compilation_cache: bool = False,
             parse_only: bool = False) -> Any:
  """Defines the module's flags, parses `argv` and runs `module.main`, with UsageError as one line.

  With `parse_only`, returns {flag: value} of the command's own flags (and `args`, the words left
  over), running nothing: the doc test's check of commands it cannot run (tests/test_docs.py)."""
  from absl import app, flags, logging

  from vit_jax import console
  from vit_jax.errors import UsageError

  app.define_help_flags()  # absl defines them once per process: before `known`, so they are never forgotten.
  known = set(flags.FLAGS)
  module.define_flags()
  if compilation_cache:
    flags.DEFINE_bool('compilation_cache', os.environ.get('VIT_JAX_COMPILATION_CACHE', '1') != '0',
                      f'Keep compiled programs in {compilation_cache_dir()} ($VIT_JAX_COMPILATION_CACHE_DIR), '
                      'so that the next run of the same model starts faster; --nocompilation_cache or '
                      'VIT_JAX_COMPILATION_CACHE=0 turns it off.')
  flags.DEFINE_bool('verbose', False, 'Show the warnings and tracebacks of the libraries underneath (orbax, '
                    f'tfds, asyncio, ...) on the console; without it they go to {console.log_path(prog)}.')

  def main(args: list[str]) -> None:
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)  # Orbax and tfds are chatty at INFO.
    console.keep_to_our_lines(prog, verbose=flags.FLAGS.verbose or flags.FLAGS['verbosity'].present)
    if compilation_cache and flags.FLAGS.compilation_cache:
      enable_compilation_cache(compilation_cache_dir())
    try:
      return module.main(args)  # app.run exits with it: the launcher's status after a stop.
    except (UsageError, app.UsageError) as e:  # absl's own would print the usage text and exit 1.
      fail(str(e))

  defined = [name for name in flags.FLAGS if name not in known]
  saved_argv = sys.argv
  # ml_collections' --config finds its --config.KEY=VALUE overrides in sys.argv. absl's app.run names
  # the process after sys.argv[0] (/proc/PID/comm): `vit-jax-train`, as a space there would hide the
  # process from tools that split /proc/PID/stat at spaces, such as SLURM's proctrack/linuxproc, which
  # then never signals it (no time-limit warning, no kill).
  sys.argv = [prog.replace(' ', '-')] + argv
  try:
    if HELP_FLAGS & set(argv):
      print(command_help(module, prog, defined))
      return 0
    if parse_only:
      rest = parse_absl_flags([prog] + argv)
      return {'args': rest[1:], **{name: flags.FLAGS[name].value for name in defined}}
    app.run(main, argv=[prog] + argv, flags_parser=parse_absl_flags)
  finally:
    sys.argv = saved_argv
    # Forget this command's flags (and the --config.KEY ones), so that `main` can run again in-process.
    for name in [n for n in flags.FLAGS if n.split('.')[0] in defined]:
      delattr(flags.FLAGS, name)
  return 0


def run(name: str, argv: list[str]) -> int:
  """Runs command `name` with the arguments after it; returns its exit code."""
  if name not in COMMANDS:
    fail(f'unknown command {name!r}; commands: {", ".join(COMMANDS)} (vit-jax --help).')
  if name != 'train' or HELP_FLAGS & set(argv):
    return _run(name, argv)
  # First of all: a stop signal (preemption, a time-limit warning) during the seconds of imports and
  # compilation below is the run's stop request, not a crash (vit_jax/training/preemption.py).
  from vit_jax.training import preemption
  preemption.catch_early()
  try:
    return _run(name, argv)
  finally:
    preemption.release_early()


def _run(name: str, argv: list[str]) -> int:
  command = COMMANDS[name]
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow's C++ start-up lines.
  from vit_jax import console
  console.keep_to_our_lines(f'vit-jax {name}', verbose=os.environ.get('VIT_JAX_VERBOSE', '0') != '0')
  if command.retain_host_memory and not HELP_FLAGS & set(argv):
    from vit_jax.cpu import hostmem
    hostmem.retain_freed_memory()  # Before JAX starts.
  if name in LOADS_TENSORFLOW and not HELP_FLAGS & set(argv):
    import_tensorflow_quietly()
  module = importlib.import_module(command.module)
  if name == 'memory':
    module.simulate_devices(argv)  # Before JAX starts its backends.
  if command.absl:
    return run_absl(module, f'vit-jax {name}', argv, compilation_cache=name in USES_COMPILATION_CACHE)
  return int(module.main(argv) or 0)


def check_flags(argv: list[str]) -> dict[str, Any]:
  """Parses `vit-jax COMMAND ARGS` with the command's own flags (a --config file loaded with its
  overrides) and returns {flag: value}, running nothing; a bad flag is the command's `error:` line and
  exit 2. For commands that cannot run where they are checked (the doc test: a GPU, a cluster)."""
  from vit_jax import errors
  name, args = argv[0], list(argv[1:])
  if name not in COMMANDS:
    fail(f'unknown command {name!r}; commands: {", ".join(COMMANDS)} (vit-jax --help).')
  command = COMMANDS[name]
  module = importlib.import_module(command.module)
  if command.absl:
    return run_absl(module, f'vit-jax {name}', args, compilation_cache=name in USES_COMPILATION_CACHE,
                    parse_only=True)
  with errors.parse_only():
    try:
      module.main(args)
    except errors.ParsedFlags as parsed:
      return vars(parsed.namespace)
  raise RuntimeError(f'vit-jax {name} ran without parsing its flags with vit_jax.errors.ArgumentParser')


def main(argv: Optional[list[str]] = None) -> int:
  """The `vit-jax` entry point."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] in ('-h', '--help', 'help'):
    print(usage())
    return 0 if argv else 2
  try:
    return run(argv[0], argv[1:])
  except KeyboardInterrupt:  # A second Ctrl-C during training (vit_jax/training/preemption.py), or one elsewhere.
    print('Interrupted: stopped without saving; the checkpoints saved before are kept.', file=sys.stderr)
    return 130
