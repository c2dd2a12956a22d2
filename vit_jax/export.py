"""Export a trained run's parameters to the published `.npz` layout, with its config beside them.

  python -m vit_jax.export --workdir DIR --out FILE.npz

Writes FILE.npz (the parameters of the latest checkpoint, keys as in the
original ViT release: `embedding/kernel`, `Transformer/encoderblock_0/...`,
`head/kernel`; written by `vit_jax.checkpoint.save_npz`) and FILE.json
(`config`: the run's config, `class_names`, `step`). The pair is all that
prediction needs, without the workdir or the dataset:

  python -m vit_jax.predict --checkpoint FILE.npz IMAGE...
"""

import json
import os
import sys
from typing import Any, Optional

from absl import app, flags, logging
import numpy as np

from vit_jax.errors import UsageError
from vit_jax.predict import Run, class_names_of, load_config


def config_path_for(npz_path: str) -> str:
  """The JSON written beside an exported `.npz`: same path, `.json` suffix."""
  return os.path.splitext(npz_path)[0] + '.json'


def export_run(run: Run, out: str) -> dict[str, str]:
  """Writes `run`'s parameters to `out` (.npz) and its config and class names beside it (.json).

  Returns the paths written ('npz', 'json').
  """
  from vit_jax import checkpoint

  if not out.endswith('.npz'):
    raise UsageError(f'--out={out!r} must end in .npz (the JSON of the config is written beside it).')
  checkpoint.save_npz(run.params, out)
  meta = {'config': json.loads(run.config.to_json_best_effort()), 'class_names': list(run.class_names),
          'step': run.step}
  json_path = config_path_for(out)
  with open(json_path, 'w') as f:
    json.dump(meta, f, indent=2, sort_keys=True)
    f.write('\n')
  return {'npz': out, 'json': json_path}


def load_exported(npz_path: str, config_path: Optional[str] = None) -> Run:
  """The Run of an exported `.npz`, with the config at `config_path` (default: the JSON beside it).

  `config_path` may also be a workdir's config.json or a configs/*.py file;
  then class names come from the dataset's metadata.
  """
  import jax
  from vit_jax import checkpoint
  from vit_jax.models import model_from_config

  config_path = config_path or config_path_for(npz_path)
  if not os.path.isfile(config_path):
    raise UsageError(f'No config for {npz_path!r}: {config_path!r} does not exist; pass --config with '
                     'the .json written by vit_jax.export, a workdir config.json or a configs/*.py file.')
  config = load_config(config_path)
  model = model_from_config(config)
  params = checkpoint.load_for_model(npz_path, model, config.input.image_size)
  params = jax.device_put(jax.tree.map(np.asarray, params), jax.local_devices()[0])
  names, step = None, None
  if config_path.endswith('.json'):
    with open(config_path) as f:
      meta: dict[str, Any] = json.load(f)
    names, step = meta.get('class_names'), meta.get('step')
  return Run(config, model, params, names or class_names_of(config), step)


def define_flags() -> None:
  """The command's flags; defined only when run as a program, so importing this module adds none."""
  flags.DEFINE_string('workdir', None, 'Training workdir whose latest checkpoint to export.')
  flags.DEFINE_string('out', None, 'The .npz to write; the config JSON goes beside it.')
  flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and tfds are chatty at INFO.
  from vit_jax.predict import load_workdir
  try:
    run = load_workdir(flags.FLAGS.workdir)
    written = export_run(run, flags.FLAGS.out)
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  size = os.path.getsize(written['npz'])
  print(f"wrote {written['npz']} (step {run.step}, {size / 1e6:.1f} MB) and {written['json']}", flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
