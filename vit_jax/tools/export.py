"""Export a trained run's parameters to the published `.npz` layout, with its config beside them.

  vit-jax export --workdir DIR --out FILE.npz [--step latest|best|STEP] [--patch_size N]

Writes FILE.npz (the parameters of the latest checkpoint, or of the one --step names; keys as in the
original ViT release: `embedding/kernel`, `Transformer/encoderblock_0/...`,
`head/kernel`; written by `vit_jax.checkpoint.save_npz`) and FILE.json
(`config`: the run's config, `class_names`, `step`). The pair is all that
prediction needs, without the workdir or the dataset:

  vit-jax predict --checkpoint FILE.npz IMAGE...

With --format saved_model, --out is a directory that gets a TensorFlow
SavedModel of the model instead (`vit_jax.tools.saved_model`: jax2tf, any
batch size; --serving_input uint8 puts the eval preprocessing inside).
"""

import json
import sys


from absl import app, flags

from vit_jax import storage
from vit_jax.errors import UsageError
from vit_jax.checkpoint.resize import at_patch_size
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
          'step': run.step, 'ema': run.ema}
  json_path = config_path_for(out)
  storage.write_text(json_path, json.dumps(meta, indent=2, sort_keys=True) + '\n')  # Local or gs://.
  return {'npz': out, 'json': json_path}


def define_flags() -> None:
  """The command's flags; defined only when run as a program, so importing this module adds none."""
  flags.DEFINE_string('workdir', None, 'Training workdir whose latest checkpoint to export.')
  flags.DEFINE_string('out', None, 'The .npz to write (the config JSON goes beside it), or with '
                      '--format saved_model the SavedModel directory.')
  flags.DEFINE_bool('ema', False, 'Export the exponential moving average of the parameters (a run '
                    'trained with config.ema.decay > 0) instead of the raw ones.')
  flags.DEFINE_string('step', 'latest', "The checkpoint: 'latest', 'best' (the kept checkpoint best "
                      "in the run's config.best_metric) or a step number.")
  flags.DEFINE_enum('format', 'npz', ['npz', 'saved_model'], "'npz' (parameters + config JSON) or "
                    "'saved_model' (a TensorFlow SavedModel directory of the model, via jax2tf).")
  flags.DEFINE_enum('serving_input', 'float', ['float', 'uint8'], "With --format saved_model: 'float' "
                    "(images as the model takes them) or 'uint8' (pixels; eval preprocessing included).")
  flags.DEFINE_integer('patch_size', None, "Export at this patch size: the patch embedding PI-resized and "
                       'position embeddings resized to it, the config\'s variant renamed (FlexiViT).')
  flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  try:
    run = at_patch_size(load_workdir(flags.FLAGS.workdir, ema=flags.FLAGS.ema, step=flags.FLAGS.step),
                        flags.FLAGS.patch_size)
    if flags.FLAGS.format == 'saved_model':
      if storage.is_url(flags.FLAGS.out):  # TensorFlow would write it through its own GCS client.
        raise UsageError(f'--out={flags.FLAGS.out}: a SavedModel is written to a local folder; export there '
                         'and copy it (gcloud storage cp -r DIR gs://...).')
      from vit_jax.tools import saved_model
      out = saved_model.export_saved_model(run, flags.FLAGS.out, flags.FLAGS.serving_input)
      print(f'wrote SavedModel {out} (step {run.step}, {flags.FLAGS.serving_input} images)', flush=True)
      return
    written = export_run(run, flags.FLAGS.out)
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  size = storage.size(written['npz'])
  print(f"wrote {written['npz']} (step {run.step}{', EMA parameters' if run.ema else ''}, {size / 1e6:.1f} MB) "
        f"and {written['json']}", flush=True)
