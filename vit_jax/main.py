"""Launcher: `python -m vit_jax.main --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]`."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vit_jax.errors import UsageError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file under configs/.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and tfds are chatty at INFO.
  from vit_jax import train  # Imported here so that --help does not load JAX.

  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (UsageError, train.DivergenceError) as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
