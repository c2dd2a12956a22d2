"""`vit-jax prepare NAME [--data_dir DIR] [--manual_dir DIR]`: a tfds dataset, prepared once for training.

Downloads the dataset's files (or reads them from `--manual_dir` for datasets
whose files are downloaded by hand, such as imagenet2012) and writes it in
the array_record format that training reads by random access, into
`--data_dir` (tfds' default, `~/tensorflow_datasets` or `$TFDS_DATA_DIR`).
It calls the dataset's tfds builder directly: `tfds build` needs apache_beam,
which vit_jax does not install. The bundled `sklearn_digits` needs no
preparing (training prepares it offline on first use).
"""

import sys
from typing import Optional

from vit_jax.errors import ArgumentParser, UsageError


def main(argv: Optional[list[str]] = None) -> int:
  parser = ArgumentParser(prog='vit-jax prepare', description=__doc__.split('\n\n')[1])
  parser.add_argument('name', help='the tfds name, e.g. cifar10, oxford_iiit_pet, imagenet2012')
  parser.add_argument('--data_dir', default=None,
                      help="tfds data directory (default: tfds' own, ~/tensorflow_datasets or $TFDS_DATA_DIR)")
  parser.add_argument('--manual_dir', default='', help='the folder holding manually downloaded files')
  args = parser.parse_args(argv)
  from vit_jax.data import pipeline  # After parsing: --help needs no TensorFlow.
  try:
    pipeline.prepare_dataset(args.name, args.data_dir, args.manual_dir)
  except UsageError as e:
    print(f'error: {e}', flush=True, file=sys.stderr)
    return 2
  return 0
