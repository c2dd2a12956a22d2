"""tfds -> tf.data -> numpy batches of this process's share of the global batch.

Data is read by random access (tfds data sources in `array_record` format), so
the global batch of step `s` is a pure function of (seed, s): example position
`p = s * batch_size + j` maps to record `perm(seed, p // N)[p % N]` of an
N-record split, and its augmentation is seeded by (seed, p). A process reads
and decodes only its own contiguous slice of each global batch. The result does
not depend on the number of processes or devices, and resuming at step `s`
reproduces exactly the data an uninterrupted run would have seen.

Evaluation visits each record once, in order; the last global batch is padded
with copies of record 0 whose `mask` is 0.

This module knows nothing of devices; it only needs the process index/count.
"""

import dataclasses
import math
from typing import Any, Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax import preprocess
from vit_jax.datasets.sklearn_digits import SklearnDigits
from vit_jax.errors import UsageError

# Builders that vit_jax ships and prepares offline on first use.
SHIPPED_BUILDERS = {'sklearn_digits': SklearnDigits}

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class Split:
  """A random-access split: `source[i]` is a dict of features with encoded images."""
  source: Any
  num_classes: int
  class_names: list[str] | None

  def __len__(self) -> int:
    return len(self.source)


def get_builder(dataset: ml_collections.ConfigDict, prepare: bool = True) -> tfds.core.DatasetBuilder:
  """Returns the prepared tfds builder for `dataset.name`, or raises UsageError.

  Shipped builders are prepared (offline, seconds) when `prepare` is set.
  """
  name, data_dir = dataset.name, dataset.data_dir or None
  if name in SHIPPED_BUILDERS:
    builder = SHIPPED_BUILDERS[name](data_dir=data_dir, file_format='array_record')
    if not builder.is_prepared() and prepare:
      builder.download_and_prepare()
    return builder
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    raise UsageError(f"Unknown dataset {name!r}: it is neither a tfds dataset nor shipped with "
                     f"vit_jax ({', '.join(SHIPPED_BUILDERS)}). Check config.dataset.name.") from None
  searched = data_dir or tfds.core.constants.DATA_DIR
  if not builder.is_prepared():
    raise UsageError(
        f"Dataset {name!r} is not prepared in {searched}. Prepare it there (with network, or "
        f"manual files for datasets like imagenet2012): `tfds build {name} --data_dir={searched} "
        "--file_format=array_record`, or point config.dataset.data_dir at a prepared copy.")
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise UsageError(
        f"Dataset {name!r} in {builder.data_dir} is stored as {builder.info.file_format.value}, "
        "but vit_jax reads by random access from array_record. Convert it once with "
        f"`tfds convert_format --dataset_version_dir={builder.data_dir} --out_file_format=array_record`.")
  return builder


def open_split(dataset: ml_collections.ConfigDict, split: str) -> Split:
  """Opens one split of the configured dataset for random access."""
  builder = get_builder(dataset)
  features = builder.info.features
  for key in (dataset.image_key, dataset.label_key):
    if key not in features:
      raise UsageError(f'Dataset {dataset.name!r} has no feature {key!r} (it has '
                       f'{", ".join(features)}); set config.dataset.image_key / label_key.')
  try:
    source = builder.as_data_source(split, decoders={dataset.image_key: tfds.decode.SkipDecoding()})
  except (ValueError, KeyError) as e:
    raise UsageError(f'Bad split {split!r} for dataset {dataset.name!r} (splits: '
                     f'{", ".join(builder.info.splits)}): {e}') from None
  label = features[dataset.label_key]
  num_classes = getattr(label, 'num_classes', None)
  if num_classes is not None and num_classes != dataset.num_classes:
    raise UsageError(f'Dataset {dataset.name!r} has {num_classes} classes but '
                     f'config.dataset.num_classes={dataset.num_classes}; set it to {num_classes}.')
  if len(source) == 0:
    raise UsageError(f'Split {split!r} of dataset {dataset.name!r} is empty.')
  return Split(source, dataset.num_classes, getattr(label, 'names', None))


def _train_preprocess(config: ml_collections.ConfigDict):
  """Returns fn(encoded, label, seed) -> (image, label) for training."""
  cfg = config.input

  def fn(encoded, label, seed):
    seeds = tf.random.experimental.stateless_split(seed, 2)
    image = preprocess.decode(encoded)
    if cfg.train_crop == 'random_resized':
      image = preprocess.random_resized_crop(image, seeds[0], cfg.image_size, cfg.crop_min_area)
    elif cfg.train_crop == 'pad_random':
      image = preprocess.pad_random_crop(image, seeds[0], cfg.image_size, cfg.crop_padding)
    elif cfg.train_crop == 'resize':
      image = preprocess.resize(image, cfg.image_size)
    else:
      raise UsageError(f"Unknown config.input.train_crop {cfg.train_crop!r}; use "
                       "'random_resized', 'pad_random' or 'resize'.")
    if cfg.flip:
      image = preprocess.random_flip(image, seeds[1])
    return preprocess.value_range(image, *cfg.value_range), tf.cast(label, tf.int32)

  return fn


def _eval_preprocess(config: ml_collections.ConfigDict):
  """Returns fn(encoded, label, mask) -> (image, label, mask) for evaluation."""
  cfg = config.input

  def fn(encoded, label, mask):
    image = preprocess.central_crop(preprocess.decode(encoded), cfg.image_size, cfg.eval_crop_fraction)
    return preprocess.value_range(image, *cfg.value_range), tf.cast(label, tf.int32), mask

  return fn


def eval_preprocess_fn(config: ml_collections.ConfigDict):
  """Returns fn(encoded) -> image: the evaluation preprocessing of one encoded image.

  For inference on image files (vit_jax.predict): exactly what eval batches get.
  """
  fn = _eval_preprocess(config)
  return lambda encoded: fn(encoded, 0, 1.0)[0]


def local_batch_size(global_batch: int, process_count: int) -> int:
  """This process's share of a global batch; raises if it does not divide."""
  if global_batch % process_count:
    raise UsageError(f'Batch size {global_batch} is not divisible by the {process_count} processes; '
                     f'use a multiple of {process_count}.')
  return global_batch // process_count


def train_positions(num_records: int, global_batch: int, seed: int, start_step: int,
                    process_index: int, process_count: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields, per step from `start_step`, (record indices, stream positions) of this process."""
  per_process = local_batch_size(global_batch, process_count)
  offsets = np.arange(process_index * per_process, (process_index + 1) * per_process)
  perms = {}
  step = start_step
  while True:
    positions = step * global_batch + offsets
    epochs, within = np.divmod(positions, num_records)
    for epoch in set(epochs.tolist()) - perms.keys():
      perms[epoch] = np.random.default_rng([seed, epoch]).permutation(num_records)
    for epoch in [e for e in perms if e < epochs.min()]:
      del perms[epoch]  # Keep only the epochs still in use.
    yield np.array([perms[e][i] for e, i in zip(epochs, within)]), positions
    step += 1


def _read(split: Split, indices, dataset: ml_collections.ConfigDict):
  """Encoded images and labels of the given records, as two numpy arrays."""
  records = split.source.__getitems__([int(i) for i in indices])
  return (np.array([r[dataset.image_key] for r in records], dtype=object),
          np.array([r[dataset.label_key] for r in records], dtype=np.int64))


def train_iterator(config: ml_collections.ConfigDict, split: Split, start_step: int,
                   process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
  """Endless numpy batches {'image', 'label'} of this process, starting at `start_step`."""
  per_process = local_batch_size(config.batch_size, process_count)

  def batches():  # One Python call per batch; tf.data does the per-example work.
    for indices, positions in train_positions(len(split), config.batch_size, config.seed,
                                              start_step, process_index, process_count):
      encoded, labels = _read(split, indices, config.dataset)
      seeds = np.stack([np.full_like(positions, config.seed), positions], axis=1)
      yield encoded, labels, seeds

  ds = tf.data.Dataset.from_generator(batches, output_signature=(
      tf.TensorSpec((None,), tf.string), tf.TensorSpec((None,), tf.int64),
      tf.TensorSpec((None, 2), tf.int64))).unbatch()
  ds = ds.map(_train_preprocess(config), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(per_process, drop_remainder=True).prefetch(config.input.prefetch)
  for image, label in ds.as_numpy_iterator():
    yield {'image': image, 'label': label}


def num_eval_batches(num_records: int, global_batch: int) -> int:
  return math.ceil(num_records / global_batch)


def eval_iterator(config: ml_collections.ConfigDict, split: Split, process_index: int = 0,
                  process_count: int = 1) -> Iterator[Batch]:
  """One pass of numpy batches {'image', 'label', 'mask'} over the split, padded and masked.

  Yields `num_eval_batches` batches on every process, so all processes run the
  same number of eval steps; summed over processes, the mask counts each
  record exactly once.
  """
  global_batch = config.eval_batch_size
  per_process = local_batch_size(global_batch, process_count)
  n = len(split)

  def batches():
    for b in range(num_eval_batches(n, global_batch)):
      positions = b * global_batch + process_index * per_process + np.arange(per_process)
      valid = positions < n
      encoded, labels = _read(split, np.where(valid, positions, 0), config.dataset)
      yield encoded, labels, valid.astype(np.float32)

  ds = tf.data.Dataset.from_generator(batches, output_signature=(
      tf.TensorSpec((None,), tf.string), tf.TensorSpec((None,), tf.int64),
      tf.TensorSpec((None,), tf.float32))).unbatch()
  ds = ds.map(_eval_preprocess(config), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(per_process).prefetch(config.input.prefetch)
  for image, label, mask in ds.as_numpy_iterator():
    yield {'image': image, 'label': label, 'mask': mask}
