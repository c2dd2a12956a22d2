"""An evaluation report of a trained run on the whole eval split.

  vit-jax evaluate --workdir DIR [--out_dir DIR/eval] [--num_confused 16]
  vit-jax evaluate --checkpoint FILE.npz [--config FILE.json] --out_dir OUT
  vit-jax evaluate --checkpoint NAME_OR_URL --config configs/X.py --out_dir OUT   (eval-only mode)
  vit-jax evaluate --workdir DIR --patch_size 8 --out_dir DIR/eval_p8   (at another patch size, FlexiViT)
  vit-jax evaluate --workdir DIR --max_tokens 64   (native aspect ratio within a patch budget)

Eval-only mode evaluates a published checkpoint (`imagenet21k+imagenet2012/ViT-B_16`,
`augreg:B/16->imagenet2012`, a URL; docs/transfer.md) without a training workdir: the
config file gives the model and the dataset, the dataset's metadata the class names.

Writes into the output folder:
  report.json           accuracy, top-5 accuracy, per-class accuracy, the most
                        confused class pairs and the most confident mistakes
  confusion_matrix.npy  (classes, classes) counts; rows: true class, columns: predicted
  confusion_matrix.png  the same, coloured by the fraction of each true class
  most_confused.png     the mistakes the model was most sure of, with true and
                        predicted class

Every example of `config.dataset.eval_split` counts exactly once: the eval
pipeline pads the last batch and masks the padding, as in training.
"""

import functools
import json
import os
import sys
from typing import Any, Optional

from absl import app, flags
import numpy as np

from vit_jax import storage
from vit_jax.errors import UsageError
from vit_jax.checkpoint.resize import at_patch_size
from vit_jax.checkpoint.run import Run, define_run_flags, run_from_flags
from vit_jax.tools.predict import softmax


def _logits(params, images, *, model):
  return model.apply({'params': params}, images, train=False)[0]


def collect_predictions(run: Run) -> dict[str, np.ndarray]:
  """Runs the model over the eval split (all devices, one process).

  Returns 'probabilities' (examples, classes), 'labels' and 'indices' (record
  index in the split) of every real example, and 'mistakes': the images
  (mistakes, size, size, 3) as the model saw them, with their 'mistake_indices'.
  """
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from vit_jax.data import naflex as naflex_data
  from vit_jax.data import pipeline

  config = run.config
  if jax.process_count() > 1:
    raise UsageError(f'vit_jax.tools.evaluate runs in one process, not {jax.process_count()}; run it on one host.')
  devices = jax.local_devices()
  if config.eval_batch_size % len(devices):
    raise UsageError(f'config.eval_batch_size={config.eval_batch_size} is not divisible by the '
                     f'{len(devices)} devices; use a multiple of {len(devices)}.')
  split = pipeline.open_split(config.dataset, config.dataset.eval_split)
  # Inference only: parameters replicated, each batch split over all devices.
  mesh = Mesh(np.asarray(devices), ('batch',))
  replicated, batch_sharding = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec('batch'))
  params = jax.device_put(run.params, replicated)
  forward = jax.jit(functools.partial(_logits, model=run.model), out_shardings=replicated)

  probabilities, labels, indices, mistakes, mistake_indices = [], [], [], [], []
  for b, batch in enumerate(pipeline.eval_iterator(config, split)):
    images = jax.device_put(batch['image'], batch_sharding)
    logits = np.asarray(jax.device_get(forward(params, images)))
    real = batch['mask'] > 0
    batch_indices = b * config.eval_batch_size + np.arange(len(real))
    probs = softmax(logits[real])
    probabilities.append(probs)
    labels.append(batch['label'][real])
    indices.append(batch_indices[real])
    wrong = probs.argmax(-1) != batch['label'][real]
    shown = batch['image']
    if isinstance(shown, dict):  # NaFlex: the patches as a picture, for most_confused.png.
      shown = naflex_data.to_images(shown, run.model.patch_size, 4 * run.model.patch_size)
    mistakes.append(shown[real][wrong])  # Kept only for the mistakes: memory stays small.
    mistake_indices.append(batch_indices[real][wrong])
  return {'probabilities': np.concatenate(probabilities), 'labels': np.concatenate(labels),
          'indices': np.concatenate(indices), 'mistakes': np.concatenate(mistakes),
          'mistake_indices': np.concatenate(mistake_indices)}


def at_max_tokens(run: Run, max_tokens: int) -> Run:
  """`run` fed NaFlex batches of at most `max_tokens` patches (config.input.max_tokens: each image
  at its own aspect ratio; learned position embeddings resized per image, RoPE and sin-cos at the
  patches' coordinates)."""
  import dataclasses
  from vit_jax.models.variants import naflex_options

  config = run.config.copy_and_resolve_references()
  config.input.max_tokens = max_tokens
  config.lock()
  return dataclasses.replace(run, config=config, model=naflex_options(run.model, config))


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """(classes, classes) counts: row = true class, column = predicted class."""
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (labels, predictions), 1)
  return matrix


def summarize(predictions: dict[str, np.ndarray], class_names: list[str], num_confused: int) -> dict[str, Any]:
  """The report: accuracy, top-5, per-class accuracy, confused pairs and most confident mistakes."""
  probs, labels = predictions['probabilities'], predictions['labels']
  num_classes = probs.shape[1]
  predicted = probs.argmax(-1)
  k = min(5, num_classes)
  top = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
  matrix = confusion_matrix(labels, predicted, num_classes)
  per_class = []
  for c, name in enumerate(class_names):
    count = int(matrix[c].sum())
    per_class.append({'class': name, 'index': c, 'count': count,
                      'accuracy': float(matrix[c, c] / count) if count else None})
  off_diagonal = matrix - np.diag(np.diag(matrix))
  pairs = np.argsort(-off_diagonal, axis=None, kind='stable')[:num_confused]
  confused_pairs = [{'true': class_names[t], 'predicted': class_names[p], 'count': int(off_diagonal[t, p])}
                    for t, p in zip(*np.unravel_index(pairs, matrix.shape)) if off_diagonal[t, p]]
  wrong = np.flatnonzero(predicted != labels)
  wrong = wrong[np.argsort(-probs[wrong, predicted[wrong]], kind='stable')][:num_confused]
  mistakes = [{'index': int(predictions['indices'][i]), 'true': class_names[labels[i]],
               'predicted': class_names[predicted[i]], 'probability': float(probs[i, predicted[i]])}
              for i in wrong]
  return {'num_examples': int(len(labels)), 'accuracy': float((predicted == labels).mean()),
          f'top{k}_accuracy': float((top == labels[:, None]).any(-1).mean()),
          'per_class': per_class, 'most_confused_pairs': confused_pairs, 'most_confident_mistakes': mistakes,
          'confusion_matrix': matrix}


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str], path: str, title: str = '') -> None:
  """Row-normalised colours (recall per class), raw counts written in the cells when they fit."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  n = len(class_names)
  rows = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
  side = min(max(4.0, 0.45 * n + 1.5), 12.0)
  fig, ax = plt.subplots(figsize=(side, side * 0.9))
  shown = ax.imshow(rows, cmap='Blues', vmin=0, vmax=1)
  fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label='fraction of the true class')
  if n <= 30:
    ax.set_xticks(range(n), class_names, rotation=90 if max(map(len, class_names)) > 3 else 0)
    ax.set_yticks(range(n), class_names)
    for t in range(n):
      for p in range(n):
        if matrix[t, p]:
          ax.text(p, t, str(matrix[t, p]), ha='center', va='center', fontsize=7,
                  color='white' if rows[t, p] > 0.5 else 'black')
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')
  ax.set_title(title or 'confusion matrix', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def plot_mistakes(images: np.ndarray, mistakes: list[dict], path: str, columns: int = 8) -> None:
  """A grid of mistake images titled `true -> predicted (probability)`."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from vit_jax.tools.attention_maps import display_image

  count = max(len(mistakes), 1)
  columns = min(columns, count)
  rows = -(-count // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(1.5 * columns, 1.7 * rows), squeeze=False)
  for ax in axes.flat:
    ax.axis('off')
  for ax, image, mistake in zip(axes.flat, images, mistakes):
    ax.imshow(display_image(image), interpolation='nearest')
    ax.set_title(f"{mistake['true']} -> {mistake['predicted']} ({mistake['probability']:.0%})", fontsize=8)
  if not mistakes:
    axes.flat[0].text(0.5, 0.5, 'no mistakes', ha='center', va='center')
  fig.suptitle('most confident mistakes: true -> predicted', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def evaluate_run(run: Run, out_dir: str, num_confused: int = 16) -> dict[str, Any]:
  """Evaluates `run` on its eval split and writes report.json and the two PNGs into `out_dir`.

  Returns the report (as written to report.json).
  """
  if num_confused < 0:
    raise UsageError(f'--num_confused={num_confused} must be zero or more.')
  predictions = collect_predictions(run)
  report = summarize(predictions, run.class_names, num_confused)
  report.update(step=run.step, ema=run.ema, dataset=run.config.dataset.name,
                split=run.config.dataset.eval_split, patch_size=run.model.patch_size)
  matrix = report.pop('confusion_matrix')  # (classes, classes): an array file, not JSON, for 1000 classes.
  where = {int(i): j for j, i in enumerate(predictions['mistake_indices'])}
  images = [predictions['mistakes'][where[m['index']]] for m in report['most_confident_mistakes']]
  with storage.staged_folder(out_dir) as folder:  # out_dir itself, or uploaded to a gs:// out_dir.
    np.save(os.path.join(folder, 'confusion_matrix.npy'), matrix)
    with open(os.path.join(folder, 'report.json'), 'w') as f:
      json.dump(report, f, indent=1)
    plot_confusion_matrix(matrix, run.class_names, os.path.join(folder, 'confusion_matrix.png'),
                          f"{report['dataset']} {report['split']}: accuracy {report['accuracy']:.2%}")
    plot_mistakes(np.asarray(images), report['most_confident_mistakes'], os.path.join(folder, 'most_confused.png'))
  return report


def define_flags() -> None:
  """The command's flags; defined only when run as a program, so importing this module adds none."""
  define_run_flags()
  flags.DEFINE_string('out_dir', None, 'Where to write the report (default: WORKDIR/eval).')
  flags.DEFINE_integer('num_confused', 16, 'How many confused pairs and mistakes to report and show.')
  flags.DEFINE_integer('patch_size', None, "Evaluate at this patch size: the run's patch embedding PI-resized "
                       'and position embeddings resized to it (FlexiViT; vit_jax/checkpoint/resize.py).')
  flags.DEFINE_integer('max_tokens', None, "Evaluate each image at its own aspect ratio within this patch "
                       "budget (NaFlex, config.input.max_tokens); default: the run's own input.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  try:
    out_dir: Optional[str] = f.out_dir or (storage.join(f.workdir, 'eval') if f.workdir else None)
    if out_dir is None:
      raise UsageError('With --checkpoint, name the output folder with --out_dir.')
    run = at_patch_size(run_from_flags(f.workdir, f.checkpoint, f.config, ema=f.ema, step=f.step),
                        f.patch_size)
    if f.max_tokens is not None:
      run = at_max_tokens(run, f.max_tokens)
    report = evaluate_run(run, out_dir, f.num_confused)
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  top = next(key for key in report if key.startswith('top') and key.endswith('_accuracy'))
  correct = round(report['accuracy'] * report['num_examples'])
  ema = ' (EMA)' if report['ema'] else ''
  at = f" at step {report['step']}" if report['step'] is not None else f' of {f.checkpoint}'  # Eval-only: no step.
  print(f"{report['dataset']} {report['split']}{at}{ema}: accuracy {report['accuracy']:.2%} "
        f"({correct} of {report['num_examples']}) | {top.split('_')[0]} {report[top]:.2%} | "
        f'report in {out_dir}/', flush=True)
