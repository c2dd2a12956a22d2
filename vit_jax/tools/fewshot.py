"""Few-shot linear accuracy of a trained (or pretrained) model on a dataset.

  vit-jax fewshot --workdir DIR --dataset NAME_OR_FOLDER [--shots 1,5,10,25] [--seeds 3] [--ema]
  vit-jax fewshot --checkpoint FILE.npz [--config FILE] --dataset NAME_OR_FOLDER

Prints one line per shot count, e.g. `5-shot accuracy: 0.9123`: the test-split
accuracy of a ridge classifier fit in closed form on k frozen pre-logit
features per class, averaged over --seeds draws (vit_jax/training/fewshot.py).
--dataset is a tfds name (prepared, in array_record format) or a folder of
class sub-folders; images get the eval preprocessing of the model's config.
"""

import time
from typing import Any, Optional, Sequence

from absl import app, flags
import numpy as np

from vit_jax.checkpoint.run import Run, define_run_flags, run_from_flags
from vit_jax.errors import UsageError


def fewshot_run(run: Run, dataset: str, shots: Sequence[int], *, train_split: str = 'train',
                test_split: str = 'test', seeds: int = 3, l2_reg: float = 2.0**10,
                data_dir: Optional[str] = None, batch_size: Optional[int] = None,
                data_dir_option: str = 'data_dir') -> dict[str, Any]:
  """Few-shot accuracies of `run`'s pre-logits on `dataset` (a tfds name or an image folder).

  Features are computed on all local devices (batch split over them); `data_dir_option` is how the
  caller sets `data_dir` (the command's flag), for the not-prepared error. Returns
  {'accuracy': {k: mean accuracy}, 'num_train', 'num_test', 'num_classes', 'seconds'}.
  """
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from vit_jax.data import pipeline
  from vit_jax.training import fewshot

  fewshot.check_shots(shots, seeds, l2_reg, what='vit-jax fewshot:')
  if jax.process_count() > 1:
    raise UsageError(f'vit-jax fewshot runs in one process, not {jax.process_count()}; run it on one host.')
  config = fewshot.dataset_config(run.config, dataset, train_split, test_split, data_dir,
                                  data_dir_option=data_dir_option)
  if batch_size is not None:
    config.unlock()
    config.eval_batch_size = batch_size
    config.lock()
  devices = jax.local_devices()
  if config.eval_batch_size < 1 or config.eval_batch_size % len(devices):
    raise UsageError(f'Batch size {config.eval_batch_size} does not split over the {len(devices)} devices; '
                     f'pass --batch_size with a multiple of {len(devices)}.')
  start = time.perf_counter()
  train = pipeline.open_split(config.dataset, train_split)
  test = pipeline.open_split(config.dataset, test_split)
  mesh = Mesh(np.asarray(devices), ('batch',))
  batch_sharding = NamedSharding(mesh, PartitionSpec('batch'))
  replicated = NamedSharding(mesh, PartitionSpec())
  params = jax.device_put(run.params, replicated)
  fn = fewshot.feature_fn(run.model, replicated, batch_sharding)
  train_features, train_labels = fewshot.compute_features(fn, params, config, train, batch_sharding)
  test_features, test_labels = fewshot.compute_features(fn, params, config, test, batch_sharding)
  accuracy = fewshot.fewshot_accuracies(train_features, train_labels, test_features, test_labels,
                                        config.dataset.num_classes, shots, seeds, l2_reg)
  return {'accuracy': accuracy, 'num_train': len(train_labels), 'num_test': len(test_labels),
          'num_classes': config.dataset.num_classes, 'seconds': time.perf_counter() - start}


def define_flags() -> None:
  """The command's flags; defined only when run as a program, so importing this module adds none."""
  define_run_flags()
  flags.DEFINE_string('dataset', None, 'A tfds dataset name or a folder of class sub-folders.')
  flags.DEFINE_string('train_split', 'train', 'Split the shots are drawn from.')
  flags.DEFINE_string('test_split', 'test', 'Split the accuracy is measured on (every example).')
  flags.DEFINE_string('data_dir', None, "tfds data directory (default: the model config's).")
  flags.DEFINE_list('shots', ['1', '5', '10', '25'], 'Training examples per class, comma-separated.')
  flags.DEFINE_integer('seeds', 3, 'Random draws of the shots; accuracies are averaged.')
  flags.DEFINE_float('l2_reg', 2.0**10, 'Ridge penalty on the standardised features.')
  flags.DEFINE_integer('batch_size', None, "Images per forward pass (default: the config's eval_batch_size).")
  flags.mark_flags_as_required(['dataset'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  try:
    shots = [int(k) for k in f.shots]
  except ValueError:
    raise UsageError(f'--shots={",".join(f.shots)}: give positive integers, e.g. --shots=1,5,10,25.') from None
  run = run_from_flags(f.workdir, f.checkpoint, f.config, ema=f.ema, step=f.step)
  result = fewshot_run(run, f.dataset, shots, train_split=f.train_split, test_split=f.test_split,
                       seeds=f.seeds, l2_reg=f.l2_reg, data_dir=f.data_dir, batch_size=f.batch_size,
                       data_dir_option='--data_dir')
  print(f'{f.dataset}: {result["num_classes"]} classes, shots from {result["num_train"]} {f.train_split} '
        f'examples, accuracy on {result["num_test"]} {f.test_split} examples, mean of {f.seeds} seeds '
        f'({result["seconds"]:.1f} s; step {run.step}{", EMA" if run.ema else ""}):', flush=True)
  for k, accuracy in result['accuracy'].items():
    print(f'{k}-shot accuracy: {accuracy:.4f}', flush=True)
