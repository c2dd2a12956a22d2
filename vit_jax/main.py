"""Launcher: `python -m vit_jax.main --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]`.

Several processes (hosts) join one run with --coordinator_address,
--num_processes and --process_id, or with --multihost where JAX detects the
cluster itself (SLURM, TPU pods).
"""

import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vit_jax import cpu_devices, hostmem
from vit_jax.errors import UsageError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file under configs/.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for a multi-process run.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process, 0..num_processes-1.')
_MULTIHOST = flags.DEFINE_bool('multihost', False,
                               'Join a multi-process run detected from the environment (SLURM, TPU).')
_CPU_DEVICES = flags.DEFINE_integer(
    'cpu_devices', None, 'Split the CPU into this many JAX devices, each running the data-parallel '
    'step on its share of the batch (default $VIT_JAX_CPU_DEVICES or 1; see vit_jax/cpu_devices.py).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and tfds are chatty at INFO.
  from vit_jax import sharding, train  # Imported here so that --help does not load JAX.

  try:
    cpu_devices.split_cpu(_CPU_DEVICES.value)  # Before JAX creates its CPU backend.
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    auto=_MULTIHOST.value)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (UsageError, train.DivergenceError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every bad flag or config override as one line and exit code 2.

  A misspelt config key surfaces from ml_collections as an AttributeError that
  carries a suggestion, a bad value as a flags error: both become `error: ...`.
  """
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    text = ' '.join(str(e).replace('\\n', ' ').replace("\\'", "'").split())
    if isinstance(e, (AttributeError, KeyError)):
      key = re.search(r"'([^']+)'", text)
      guess = re.search(r'Did you mean "([^"]+)"', text)
      text = (f'unknown config key {key.group(1) if key else text!r}'
              + (f' (did you mean "{guess.group(1)}"?)' if guess else '')
              + '; every key is declared in configs/base.py')
    print(f'error: {text}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  hostmem.retain_freed_memory()  # Before JAX starts: see vit_jax/hostmem.py.
  app.run(main, flags_parser=parse_flags)
