"""Predict the classes of image files with a trained ViT, optionally with attention maps.

  vit-jax predict --workdir DIR [--top_k 5] [--attention_maps OUTDIR] IMAGE_OR_FOLDER...
  vit-jax predict --checkpoint FILE.npz [--config FILE.json] IMAGE_OR_FOLDER...

Each image gets exactly the evaluation preprocessing of the run's config
(`pipeline.eval_preprocess_fn`: decode, resize the short side, central
crop, value range), so files of any size work. A folder stands for the image
files in it and in its sub-folders (one per class, as for training), in path
order; files that do not decode are skipped with a warning line. Parameters come from the latest
orbax checkpoint of `--workdir`, or from an exported `.npz` (vit-jax export)
with the config JSON written beside it. Class names come from the dataset's
tfds metadata (or from the exported JSON).
"""

import functools
import os
import sys
from typing import Any, Iterator, Optional, Sequence

from absl import flags
import jax
import ml_collections
import numpy as np

from vit_jax.checkpoint.run import Run, define_run_flags, run_from_flags
from vit_jax.errors import UsageError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.gif', '.bmp')


def find_images(paths: Sequence[str]) -> list[str]:
  """Image files named by `paths`: files as given, folders as the image files in them and in their
  sub-folders (e.g. one per class, the layout training reads), in path order."""
  files = []
  for path in paths:
    if os.path.isdir(path):
      found = []
      for folder, subfolders, names in os.walk(path):
        subfolders.sort()
        found += sorted(os.path.join(folder, name) for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
      if not found:
        raise UsageError(f'Folder {path!r} holds no image files ({", ".join(IMAGE_EXTENSIONS)}), '
                         'neither directly nor in sub-folders.')
      files += found
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise UsageError(f'No such image file or folder: {path!r}.')
  if not files:
    raise UsageError('No images given; name image files or folders after the flags.')
  return files


def decode_images(config: ml_collections.ConfigDict, files: Sequence[str], skip: bool
                  ) -> tuple[list[str], list[np.ndarray]]:
  """(files that decode, their images after evaluation preprocessing); with `skip`, a file that does
  not decode gets a warning line (as in training) instead of a UsageError."""
  import tensorflow as tf
  from vit_jax.data import pipeline

  preprocess = pipeline.eval_preprocess_fn(config)
  kept, images = [], []
  for path in files:
    with open(path, 'rb') as f:
      encoded = f.read()
    try:
      images.append(jax.tree.map(lambda t: t.numpy(), preprocess(tf.constant(encoded))))  # NaFlex: a dict.
    except tf.errors.InvalidArgumentError:
      if not skip:
        raise UsageError(f'Cannot decode {path!r} as an image; pass PNG, JPEG, GIF or BMP files.') from None
      print(f'warning: skipped {path}: it does not decode as an image (PNG, JPEG, GIF or BMP).',
            file=sys.stderr, flush=True)
      continue
    kept.append(path)
  return kept, images


def load_images(config: ml_collections.ConfigDict, files: Sequence[str]) -> np.ndarray:
  """The files after evaluation preprocessing, (n, height, width, 3) float32 (config.input.image_size)."""
  return np.stack(decode_images(config, files, skip=False)[1])


@functools.partial(jax.jit, static_argnames=('model', 'return_attention'))
def _forward(params, images, *, model, return_attention: bool):
  # Jitted once per (model, return_attention, batch shape): repeated calls reuse the compilation.
  logits, intermediates = model.apply({'params': params}, images, train=False,
                                      return_attention=return_attention)
  if not return_attention:
    return logits, None
  return logits, {k: v for k, v in intermediates.items() if k in ('attention', 'map_attention')}


def predict_batches(run: Run, files: Sequence[str], batch_size: int = 32, return_attention: bool = False,
                    skip_undecodable: bool = False
                    ) -> Iterator[tuple[list[str], np.ndarray, np.ndarray, Optional[dict[str, Any]]]]:
  """Runs the model over `files` in batches.

  Yields (files, images, logits, attention) per batch: images
  (n, size, size, 3) as the model saw them, logits (n, classes) and, with
  `return_attention`, the model's intermediates 'attention' (per layer,
  (n, heads, tokens, tokens)) and, for pool 'map', 'map_attention' (else None).
  Every batch is padded to the same size, so the model compiles once. With
  `skip_undecodable`, files that do not decode are left out with a warning
  (else they raise UsageError).
  """
  size = max(1, min(batch_size, len(files)))
  for start in range(0, len(files), size):
    chunk, decoded = decode_images(run.config, files[start:start + size], skip=skip_undecodable)
    if not chunk:
      continue
    images = jax.tree.map(lambda *x: np.stack(x), *decoded)
    # Padded with copies of the first image (a real NaFlex grid), dropped from the results.
    padded = jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[:1], size - len(chunk), axis=0)]), images)
    logits, attention = jax.device_get(_forward(run.params, padded, model=run.model,
                                                return_attention=return_attention))
    n = len(chunk)
    if attention is not None:
      attention = jax.tree.map(lambda a: np.asarray(a[:n]), attention)
    if isinstance(images, dict):  # NaFlex: each image's patches back as a picture.
      from vit_jax.data import naflex as naflex_data
      images = naflex_data.to_images(images, run.model.patch_size, 4 * run.model.patch_size)
    yield chunk, images, np.asarray(logits[:n]), attention


def predict_logits(run: Run, files: Sequence[str], batch_size: int = 32) -> np.ndarray:
  """Logits (n, classes) of the image files, in order."""
  return np.concatenate([logits for _, _, logits, _ in predict_batches(run, files, batch_size)])


def softmax(logits: np.ndarray) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  z = np.exp(z - z.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


def top_k(probabilities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices, probabilities) of the k most likely classes per row, most likely first."""
  order = np.argsort(-probabilities, axis=-1, kind='stable')[..., :k]
  return order, np.take_along_axis(probabilities, order, axis=-1)


def format_predictions(path: str, probabilities: np.ndarray, class_names: Sequence[str], k: int) -> str:
  """The report of one image: its path, then one `  PROB%  NAME` line per top-k class."""
  indices, probs = top_k(probabilities, k)
  return '\n'.join([path] + [f'  {p:7.2%}  {class_names[i]}' for i, p in zip(indices, probs)])


def predict_main(paths: Sequence[str], *, workdir: Optional[str] = None, checkpoint: Optional[str] = None,
                 config: Optional[str] = None, top_k_classes: int = 5, attention_dir: Optional[str] = None,
                 batch_size: int = 32, ema: bool = False, step: str = 'latest') -> None:
  """The command: prints the top-k classes of each image; writes attention maps into `attention_dir`."""
  from vit_jax.tools import attention_maps

  if top_k_classes < 1 or batch_size < 1:
    raise UsageError(f'--top_k={top_k_classes} and --batch_size={batch_size} must be positive integers.')
  files = find_images(paths)
  run = run_from_flags(workdir, checkpoint, config, ema=ema, step=step)
  if attention_dir and run.config.input.max_tokens:
    raise UsageError(f'--attention_maps: not yet for a NaFlex run (config.input.max_tokens='
                     f'{run.config.input.max_tokens}); drop --attention_maps.')
  k = min(top_k_classes, len(run.class_names))
  used_names: set[str] = set()
  predicted = 0
  skip = len(files) > 1  # Among several images, one that does not decode gets a warning, as in training.
  for chunk, images, logits, attention in predict_batches(run, files, batch_size, skip_undecodable=skip,
                                                           return_attention=bool(attention_dir)):
    predicted += len(chunk)
    probabilities = softmax(logits)
    maps = attention_maps.attention_maps(attention, run.model, images.shape[1:3]) if attention_dir else None
    for i, path in enumerate(chunk):
      print(format_predictions(path, probabilities[i], run.class_names, k), flush=True)
      if maps is None:
        continue
      name = stem = os.path.splitext(os.path.basename(path))[0]
      for n in range(1, len(files) + 1):  # Same-named files from different folders stay apart.
        if name not in used_names:
          break
        name = f'{stem}_{n}'
      used_names.add(name)
      best = int(np.argmax(probabilities[i]))
      written = attention_maps.save_maps(
          attention_dir, name, attention_maps.display_image(images[i]),
          {kind: m[i] for kind, m in maps.items()},
          title=f'{os.path.basename(path)}: {run.class_names[best]} ({probabilities[i, best]:.1%})')
      print(f'  attention maps: {written["png"]}', flush=True)
  if not predicted:
    raise UsageError(f'None of the {len(files)} image files decode; pass PNG, JPEG, GIF or BMP files.')


def define_flags() -> None:
  """The command's flags; defined only when run as a program, so importing this module adds none."""
  define_run_flags()
  flags.DEFINE_integer('top_k', 5, 'How many classes to show per image.')
  flags.DEFINE_string('attention_maps', None, 'Write attention-map PNGs and .npy arrays into this folder.')
  flags.DEFINE_integer('batch_size', 32, 'Images per forward pass.')


def main(argv):
  f = flags.FLAGS
  try:
    predict_main(argv[1:], workdir=f.workdir, checkpoint=f.checkpoint, config=f.config,
                 top_k_classes=f.top_k, attention_dir=f.attention_maps, batch_size=f.batch_size, ema=f.ema,
                 step=f.step)
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
