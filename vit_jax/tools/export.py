"""Export a trained run's parameters to the published `.npz` layout, with its config beside them.

  python -m vit_jax.tools.export --workdir DIR --out FILE.npz

Writes FILE.npz (the parameters of the latest checkpoint, keys as in the
original ViT release: `embedding/kernel`, `Transformer/encoderblock_0/...`,
`head/kernel`; written by `vit_jax.checkpoint.save_npz`) and FILE.json
(`config`: the run's config, `class_names`, `step`). The pair is all that
prediction needs, without the workdir or the dataset:

  python -m vit_jax.tools.predict --checkpoint FILE.npz IMAGE...
"""

import json
import os
import sys


from absl import app, flags, logging
import numpy as np

from vit_jax.errors import UsageError
from vit_jax.checkpoint.run import Run, config_path_for, load_workdir


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
  try:
    run = load_workdir(flags.FLAGS.workdir)
    written = export_run(run, flags.FLAGS.out)
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  size = os.path.getsize(written['npz'])
  print(f"wrote {written['npz']} (step {run.step}, {size / 1e6:.1f} MB) and {written['json']}", flush=True)
