"""Is data or compute the bottleneck? Times the training input pipeline alone, and a train step.

  vit-jax input-benchmark [--folder=PATH] [--model=S/16]

Prints the images/s of the real training pipeline (`pipeline.train_iterator`
on an image folder: JPEG decode, 224 px Inception crop, flip, RandAugment 2/10,
batching) on this machine's CPU cores, then the images/s of one ViT training
step (`steps.train_step`, synthetic data, batch `--model_batch_size`) on the
default JAX devices. When the first number is the larger, the pipeline keeps
up. Without --folder it writes JPEGs of a typical photo size (500x375, like
ImageNet's median) to a temporary folder first.
"""

import os
import tempfile
import time

from absl import flags, logging


def define_flags() -> None:
  """The command's flags; defined when the command runs, so importing this module adds none."""
  global _FOLDER, _NUM_IMAGES, _BATCH_SIZE, _STEPS, _IMAGE_SIZE, _RANDAUGMENT, _MAGNITUDE, _THREADS, _MODEL, _MODEL_BATCH, _MODEL_STEPS
  _FOLDER = flags.DEFINE_string('folder', '', 'Image folder (one sub-folder per class); default: generated JPEGs.')
  _NUM_IMAGES = flags.DEFINE_integer('num_images', 256, 'JPEGs to generate when --folder is not given.')
  _BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Pipeline batch size.')
  _STEPS = flags.DEFINE_integer('steps', 12, 'Pipeline batches timed (after 2 warm-up batches).')
  _IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Side of the training crops.')
  _RANDAUGMENT = flags.DEFINE_integer('randaugment_layers', 2, 'RandAugment layers (0 disables).')
  _MAGNITUDE = flags.DEFINE_integer('randaugment_magnitude', 10, 'RandAugment magnitude, 0..10.')
  _THREADS = flags.DEFINE_integer('threads', 0, 'config.input.threads (0: one per core).')
  _MODEL = flags.DEFINE_string('model', 'S/16', "ViT variant whose train step is timed; '' skips it.")
  _MODEL_BATCH = flags.DEFINE_integer('model_batch_size', 8, 'Batch of the timed train step.')
  _MODEL_STEPS = flags.DEFINE_integer('model_steps', 3, 'Train steps timed (after one compiling step).')


def write_jpegs(folder: str, num_images: int, num_classes: int = 4, size: tuple[int, int] = (375, 500),
                seed: int = 0) -> None:
  """Writes `num_images` photo-like JPEGs (smooth colour fields plus grain) in class sub-folders."""
  import numpy as np
  import tensorflow as tf

  rng = np.random.default_rng(seed)
  for i in range(num_images):
    coarse = rng.uniform(0, 255, (1, 6, 8, 3)).astype(np.float32)
    image = tf.image.resize(coarse, size, method='bicubic')[0].numpy()
    image += rng.normal(0, 12, image.shape)  # Grain, so the JPEGs have realistic entropy.
    pixels = np.clip(image, 0, 255).astype(np.uint8)
    class_dir = os.path.join(folder, f'class_{i % num_classes}')
    os.makedirs(class_dir, exist_ok=True)
    with open(os.path.join(class_dir, f'{i:05d}.jpg'), 'wb') as f:
      f.write(tf.io.encode_jpeg(pixels, quality=90).numpy())


def pipeline_images_per_sec(folder: str) -> float:
  """Images/s of the training pipeline on `folder`, after two warm-up batches."""
  from vit_jax.config import defaults
  from vit_jax.data import pipeline
  from vit_jax.data.builders import image_folder

  config = defaults.get_config()
  config.dataset.name = pipeline.IMAGE_FOLDER
  config.dataset.folder = folder
  # Indexing checks the folder (missing, fewer than 2 classes, no images); the pipeline reuses the index.
  config.dataset.num_classes = len(image_folder.index_folder(folder, 0.0).class_names)
  config.dataset.test_fraction = 0.0
  config.batch_size = _BATCH_SIZE.value
  config.input.image_size = _IMAGE_SIZE.value
  config.input.train_crop = 'random_resized'
  config.input.flip = True
  config.input.randaugment.num_layers = _RANDAUGMENT.value
  config.input.randaugment.magnitude = _MAGNITUDE.value
  config.input.threads = _THREADS.value
  split = pipeline.open_split(config.dataset, 'train')
  batches = pipeline.train_iterator(config, split, start_step=0)
  for _ in range(2):
    next(batches)
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    next(batches)
  return _STEPS.value * config.batch_size / (time.perf_counter() - start)


def model_config(variant: str):
  """The config of the timed train step; raises UsageError for a bad --model or --image_size."""
  from vit_jax.config import defaults
  from vit_jax.errors import UsageError
  from vit_jax.models import model_from_config

  config = defaults.get_config()
  config.model.variant = variant
  config.dataset.num_classes = 1000
  config.input.image_size = _IMAGE_SIZE.value
  config.batch_size = _MODEL_BATCH.value
  try:
    model_from_config(config)
  except UsageError as e:
    raise UsageError(f'--model={variant} --image_size={_IMAGE_SIZE.value}: {e}') from None
  return config


def train_step_images_per_sec(variant: str) -> tuple[float, str]:
  """Images/s of `steps.train_step` for `variant` at the benchmark's image size, synthetic data."""
  import functools

  import jax
  import jax.numpy as jnp

  from vit_jax.training import optim
  from vit_jax.training import steps
  from vit_jax.models import model_from_config

  config = model_config(variant)
  model = model_from_config(config)
  tx, schedule = optim.create_optimizer(config), optim.create_schedule(config)
  state = jax.jit(functools.partial(steps.create_train_state, model=model, tx=tx,
                                    image_size=config.input.image_size))(jax.random.key(0))
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, schedule=schedule,
                                   label_smoothing=0.0), donate_argnums=0)
  size = config.input.image_size
  batch = {'image': jax.random.normal(jax.random.key(1), (config.batch_size, size, size, 3)),
           'label': jnp.arange(config.batch_size) % 1000}
  rng = jax.random.key(2)
  state, metrics = step(state, batch, rng)  # Compiles.
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(_MODEL_STEPS.value):
    state, metrics = step(state, batch, rng)
  jax.block_until_ready(metrics)
  rate = _MODEL_STEPS.value * config.batch_size / (time.perf_counter() - start)
  return rate, f'{jax.device_count()} {jax.devices()[0].platform.upper()} device(s)'


def check_flags() -> None:
  """Raises UsageError for a flag value the benchmark cannot run with, before anything is timed."""
  from vit_jax.errors import UsageError

  for holder in (_NUM_IMAGES, _BATCH_SIZE, _STEPS, _IMAGE_SIZE, _MODEL_BATCH, _MODEL_STEPS):
    if holder.value < 1:
      raise UsageError(f'--{holder.name}={holder.value} must be a positive integer.')
  if _THREADS.value < 0:
    raise UsageError(f'--threads={_THREADS.value} must be 0 (one per core) or more.')
  if _FOLDER.value and not os.path.isdir(_FOLDER.value):
    raise UsageError(f'--folder={_FOLDER.value!r} is not a folder; pass a folder with one sub-folder of '
                     'images per class, or leave --folder out to time generated JPEGs.')
  if _MODEL.value:
    model_config(_MODEL.value)


def main(argv):
  from vit_jax.errors import UsageError

  if len(argv) > 1:
    raise UsageError(f'unexpected arguments: {" ".join(argv[1:])}; every option is a --flag.')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  check_flags()
  cores = len(os.sched_getaffinity(0))
  threads = _THREADS.value or cores
  recipe = (f'{_IMAGE_SIZE.value} px Inception crop + flip + RandAugment({_RANDAUGMENT.value}, '
            f'{_MAGNITUDE.value}), batch {_BATCH_SIZE.value}')
  with tempfile.TemporaryDirectory() as tmp:
    folder = _FOLDER.value
    if not folder:
      folder = os.path.join(tmp, 'images')
      write_jpegs(folder, _NUM_IMAGES.value)
      source = f'{_NUM_IMAGES.value} generated 500x375 JPEGs'
    else:
      source = folder
    rate = pipeline_images_per_sec(folder)
  print(f'input pipeline: {rate:.1f} images/s ({recipe}; {source}) on {cores} CPU cores, '
        f'{threads} tf.data threads', flush=True)
  if _MODEL.value:
    step_rate, devices = train_step_images_per_sec(_MODEL.value)
    print(f'ViT-{_MODEL.value} training: {step_rate:.1f} images/s ({_IMAGE_SIZE.value} px, batch '
          f'{_MODEL_BATCH.value}, synthetic data, {devices})', flush=True)
    verdict = 'keeps up with' if rate >= step_rate else 'is SLOWER than'
    print(f'the input pipeline {verdict} training ({rate / step_rate:.1f}x)', flush=True)
