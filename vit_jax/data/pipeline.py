"""tfds or image folder -> tf.data -> numpy batches of this process's share of the global batch.

Data is read by random access (tfds data sources in `array_record` format, or
`datasets.image_folder.ImageFolderSource` with the same interface), so
the global batch of step `s` is a pure function of (seed, s): example position
`p = s * batch_size + j` maps to record `perm(seed, p // N)[p % N]` of an
N-record split, and its augmentation is seeded by (seed, p). A process reads
and decodes only its own contiguous slice of each global batch. The result does
not depend on the number of processes or devices, and resuming at step `s`
reproduces exactly the data an uninterrupted run would have seen. Images stay
encoded until the per-example tf.data map decodes and augments them
(preprocess, augment); mixup/CutMix then mix neighbouring positions 2k, 2k+1,
which always lie in the same process.

Evaluation visits each record once, in order; the last global batch is padded
with copies of record 0 whose `mask` is 0.

This module knows nothing of devices; it only needs the process index/count.
"""

import contextlib
import dataclasses
import io
import math
import os
from typing import Any, Iterator

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax.data import augment
from vit_jax.data import naflex
from vit_jax.data import preprocess
from vit_jax.data.builders import image_folder
from vit_jax.data.builders.sklearn_digits import SklearnDigits
from vit_jax import storage
from vit_jax.errors import UsageError

# Builders that vit_jax ships and prepares offline on first use.
SHIPPED_BUILDERS = {'sklearn_digits': SklearnDigits}
# config.dataset.name of the user's own images (config.dataset.folder).
IMAGE_FOLDER = 'image_folder'

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class Split:
  """A random-access split: `source[i]` is a dict of features with encoded images."""
  source: Any
  num_classes: int
  class_names: list[str] | None

  def __len__(self) -> int:
    return len(self.source)


def get_builder(dataset: ml_collections.ConfigDict, prepare: bool = True,
                data_dir_option: str = 'config.dataset.data_dir') -> tfds.core.DatasetBuilder | None:
  """Returns the prepared tfds builder for `dataset.name`, or raises UsageError.

  `data_dir_option` is how the user's command sets the data directory, for the error's fix.

  Shipped builders are prepared (offline, seconds) when `prepare` is set, and
  so is a dataset with `dataset.manual_dir`. An image folder has no builder:
  it is indexed (and checked) instead, and None is returned.
  """
  name, data_dir = dataset.name, dataset.data_dir or None
  if storage.is_url(data_dir):
    # array_record (the random access this pipeline is built on) opens gs:// files through a client of its
    # own that no setting points at a test server: an untested path, refused (docs/storage.md).
    raise UsageError(f'config.dataset.data_dir={data_dir!r}: datasets in a bucket are not supported (their '
                     'array_record files would be read through a client vit_jax cannot test); copy the prepared '
                     f'dataset to local disk (gcloud storage cp -r {data_dir.rstrip("/")}/{name} DIR/) and set '
                     'config.dataset.data_dir=DIR.')
  if name == IMAGE_FOLDER:
    image_folder.index_folder(dataset.folder, dataset.test_fraction)
    return None
  if name in SHIPPED_BUILDERS:
    with quiet_tfds():
      builder = SHIPPED_BUILDERS[name](data_dir=data_dir, file_format='array_record')
      if not builder.is_prepared() and prepare:
        print(f'Preparing the bundled {name!r} dataset in {builder.data_dir} (once, seconds).', flush=True)
        with contextlib.redirect_stdout(io.StringIO()):  # tfds' "Downloading and preparing ..." banners.
          builder.download_and_prepare()
    return builder
  builder = _find_builder(name, data_dir)
  searched = data_dir or tfds.core.constants.DATA_DIR
  if not is_prepared(builder) and dataset.manual_dir and prepare:
    prepare_dataset(name, data_dir, dataset.manual_dir)
    builder = _find_builder(name, data_dir)
  if not is_prepared(builder):
    manual = builder.MANUAL_DOWNLOAD_INSTRUCTIONS
    raise UsageError(
        f"Dataset {name!r} is not prepared in {searched}. Prepare it there once"
        + (' from its manually downloaded files' if manual else '') + f": `vit-jax prepare {name} "
        f"--data_dir={searched}" + (' --manual_dir=FOLDER_OF_THE_FILES`, or set config.dataset.manual_dir '
                                    'to prepare it at start' if manual else '`')
        + f"; or point {data_dir_option} at a prepared copy.")
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise UsageError(_not_array_record(name, builder))
  return builder


@contextlib.contextmanager
def quiet_tfds() -> Iterator[None]:
  """No tfds progress bars, and only its errors logged, while a shipped dataset is found or prepared.

  Our own line says what is being prepared; tfds' warnings here are about the
  folder it is writing ("Variant folder ... has no dataset_info.json").
  """
  tfds.disable_progress_bar()
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


def _find_builder(name: str, data_dir: str | None, **kwargs) -> tfds.core.DatasetBuilder:
  """tfds' builder of `name` in `data_dir`, with tfds' warnings about the folders it looked in (they are
  only missing or not prepared, which the caller says in its own line) kept off the console."""
  try:
    with quiet_tfds():
      return tfds.builder(name, data_dir=data_dir, **kwargs)
  except tfds.core.DatasetNotFoundError:
    raise UsageError(f"Unknown dataset {name!r}: it is neither a tfds dataset nor shipped with "
                     f"vit_jax ({', '.join(SHIPPED_BUILDERS)}). Check config.dataset.name.") from None


def is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  with quiet_tfds():
    return builder.is_prepared()


def _not_array_record(name: str, builder: tfds.core.DatasetBuilder) -> str:
  # `tfds convert_format` would convert it in place, but needs apache_beam, which vit_jax does not install.
  return (f"Dataset {name!r} in {builder.data_dir} is stored as {builder.info.file_format.value}, but vit_jax "
          "reads by random access from array_record. Prepare an array_record copy in another folder with "
          f"`vit-jax prepare {name} --data_dir=OTHER_FOLDER` and point the run at it (config.dataset.data_dir).")


def prepare_dataset(name: str, data_dir: str | None = None, manual_dir: str = '') -> tfds.core.DatasetBuilder:
  """Prepares tfds dataset `name` in `data_dir` (tfds' default if None) in the array_record format that
  training reads, downloading its files, or reading them from `manual_dir` for datasets whose files are
  downloaded by hand (imagenet2012). What `vit-jax prepare NAME` runs; `tfds build` needs apache_beam,
  which vit_jax does not install. Returns the prepared builder; raises UsageError in one line."""
  if manual_dir and not os.path.isdir(manual_dir):
    raise UsageError(f'--manual_dir={manual_dir!r} is not a directory; point it at the folder holding the '
                     f'manually downloaded files of {name!r}.')
  if name in SHIPPED_BUILDERS:
    with quiet_tfds():
      builder = SHIPPED_BUILDERS[name](data_dir=data_dir, file_format='array_record')
  else:
    builder = _find_builder(name, data_dir, file_format='array_record')
  if is_prepared(builder):
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
      raise UsageError(_not_array_record(name, builder))
    print(f'{name!r} is already prepared in {builder.data_dir}.', flush=True)
    return builder
  source = f'from the files in {manual_dir}' if manual_dir else 'downloading its files'
  print(f'Preparing {name!r} in {builder.data_dir}, {source} (once; large datasets take hours).', flush=True)
  config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
  try:
    builder.download_and_prepare(download_config=config)
  except Exception as e:  # tfds raises assorted types; the user needs the message, on one line.
    raise UsageError(f'Preparing {name!r} in {builder.data_dir} failed: '
                     f'{" ".join(str(e).split())[:400] or type(e).__name__}') from e
  print(f'Prepared {name!r}: {", ".join(f"{k} {v.num_examples:,}" for k, v in builder.info.splits.items())} '
        f'examples in {builder.data_dir}.', flush=True)
  return builder


def open_split(dataset: ml_collections.ConfigDict, split: str) -> Split:
  """Opens one split of the configured dataset (tfds or image folder) for random access."""
  if dataset.name == IMAGE_FOLDER:
    source, names = image_folder.open_split(dataset.folder, split, dataset.test_fraction)
    _check_num_classes(dataset, len(names))
    if len(source) == 0:
      raise UsageError(f'Split {split!r} of image folder {dataset.folder!r} is empty (no readable '
                       'images); add images or change config.dataset.test_fraction.')
    return Split(source, dataset.num_classes, names)
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
  if getattr(label, 'num_classes', None) is not None:
    _check_num_classes(dataset, label.num_classes)
  if len(source) == 0:
    raise UsageError(f'Split {split!r} of dataset {dataset.name!r} is empty.')
  return Split(source, dataset.num_classes, getattr(label, 'names', None))


def class_names(dataset: ml_collections.ConfigDict) -> list[str] | None:
  """The dataset's class names without reading its examples (None if it names none).

  An image folder's are its class sub-folders (a listing: no image is
  decoded, unlike `open_split`); a tfds dataset's come from its metadata.
  """
  if dataset.name == IMAGE_FOLDER:
    if not dataset.folder or not os.path.isdir(dataset.folder):
      raise UsageError(f'Image folder {dataset.folder!r} does not exist.')
    names = image_folder.class_names(dataset.folder)
  else:
    features = get_builder(dataset, prepare=False).info.features
    if dataset.label_key not in features:
      raise UsageError(f'Dataset {dataset.name!r} has no feature {dataset.label_key!r}.')
    names = getattr(features[dataset.label_key], 'names', None)
  if names:
    _check_num_classes(dataset, len(names))
  return list(names) if names else None


def _check_num_classes(dataset: ml_collections.ConfigDict, num_classes: int) -> None:
  if num_classes != dataset.num_classes:
    raise UsageError(f'Dataset {dataset.name!r} has {num_classes} classes but '
                     f'config.dataset.num_classes={dataset.num_classes}; set it to {num_classes}.')


def model_input(image: tf.Tensor, cfg: ml_collections.ConfigDict) -> tf.Tensor:
  """Pixels 0..255 to the model's input values, as config.input.normalization says (also the SavedModel's)."""
  if cfg.normalization == 'value_range':
    return preprocess.value_range(image, *cfg.value_range)
  if cfg.normalization == 'mean_std':
    return preprocess.normalize(image, cfg.mean, cfg.std)
  raise UsageError(f"Unknown config.input.normalization {cfg.normalization!r}; use 'value_range' "
                   "([-1, 1] for the published ViT models) or 'mean_std'.")


def _parallel_map(ds: tf.data.Dataset, fn) -> tf.data.Dataset:
  """`ds.map(fn)` on tf.data's threads, in order, with `fn` traced as written (`preprocess.plain_graph`)."""
  return ds.map(preprocess.plain_graph(fn), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def mixing(config: ml_collections.ConfigDict) -> bool:
  """Whether training batches are mixed (mixup/CutMix), which makes their labels soft."""
  return config.input.mixup_alpha > 0 or config.input.cutmix_alpha > 0


def _train_preprocess(config: ml_collections.ConfigDict):
  """Returns fn(encoded, label, seed) -> (image, label[, mix params]) for training."""
  cfg = config.input
  if cfg.max_tokens:  # Native aspect ratio: a NaFlex example in place of the image.
    return naflex.train_preprocess(config, model_input)
  crops = {
      'random_resized': lambda image, seed: preprocess.random_resized_crop(
          image, seed, cfg.image_size, cfg.crop_min_area),
      'pad_random': lambda image, seed: preprocess.pad_random_crop(image, seed, cfg.image_size, cfg.crop_padding),
      'resize': lambda image, seed: preprocess.resize(image, cfg.image_size),
  }
  if cfg.train_crop not in crops:
    raise UsageError(f"Unknown config.input.train_crop {cfg.train_crop!r}; use "
                     "'random_resized', 'pad_random' or 'resize'.")
  randaugment = cfg.randaugment
  if randaugment.num_layers < 0 or not 0 <= randaugment.magnitude <= augment.MAX_MAGNITUDE:
    raise UsageError(f'config.input.randaugment num_layers={randaugment.num_layers}, magnitude='
                     f'{randaugment.magnitude}: use num_layers >= 0 (0 disables) and magnitude in 0..10.')

  def fn(encoded, label, seed):
    # One stream per random step, so enabling one augmentation does not change the others.
    crop_seed, flip_seed, randaugment_seed, mix_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4))
    image = crops[cfg.train_crop](preprocess.decode(encoded), crop_seed)
    if cfg.flip:
      image = preprocess.random_flip(image, flip_seed)
    if randaugment.num_layers:
      image = augment.randaugment(image, randaugment_seed, randaugment.num_layers, randaugment.magnitude)
    outputs = (model_input(image, cfg), tf.cast(label, tf.int32))
    if mixing(config):
      outputs += (augment.mix_params(mix_seed, cfg.mixup_alpha, cfg.cutmix_alpha),)
    return outputs

  return fn


def eval_preprocess_fn(config: ml_collections.ConfigDict):
  """Returns fn(encoded image bytes) -> float32 (image_size, image_size, 3) model input.

  Evaluation's deterministic preprocessing: decode, resize the short side,
  central crop, normalize; vit_jax.tools.predict applies it to image files, so they
  get exactly what eval batches get. With config.input.max_tokens, a NaFlex example
  {'patches', 'grid'} (vit_jax/data/naflex.py) in place of the image.
  """
  cfg = config.input
  if cfg.max_tokens:
    return naflex.eval_preprocess(config, model_input)

  def fn(encoded):
    image = preprocess.central_crop(preprocess.decode(encoded), cfg.image_size, cfg.eval_crop_fraction)
    return model_input(image, cfg)

  return fn


def _eval_preprocess(config: ml_collections.ConfigDict):
  """Returns fn(encoded, label, mask) -> (image, label, mask) for evaluation."""
  image_fn = eval_preprocess_fn(config)
  return lambda encoded, label, mask: (image_fn(encoded), tf.cast(label, tf.int32), mask)


def _options(config: ml_collections.ConfigDict) -> tf.data.Options:
  """tf.data threading: config.input.threads > 0 caps the pool that decodes and augments."""
  options = tf.data.Options()
  if config.input.threads > 0:
    options.threading.private_threadpool_size = config.input.threads
  options.threading.max_intra_op_parallelism = 1  # Parallel over examples, not inside one op.
  return options


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
  """Endless numpy batches {'image', 'label'} of this process, starting at `start_step`.

  Labels are int32 (batch,), or float32 (batch, num_classes) soft labels when
  mixup or CutMix is on (see `mixing`).
  """
  per_process = local_batch_size(config.batch_size, process_count)
  cfg = config.input
  if mixing(config) and per_process % 2:
    raise UsageError(f'Mixup/CutMix pairs neighbouring examples, so the per-process batch must be even; '
                     f'batch_size={config.batch_size} over {process_count} processes gives {per_process}.')

  def batches():  # One Python call per batch; tf.data does the per-example work.
    for indices, positions in train_positions(len(split), config.batch_size, config.seed,
                                              start_step, process_index, process_count):
      encoded, labels = _read(split, indices, config.dataset)
      seeds = np.stack([np.full_like(positions, config.seed), positions], axis=1)
      yield encoded, labels, seeds

  ds = tf.data.Dataset.from_generator(batches, output_signature=(
      tf.TensorSpec((None,), tf.string), tf.TensorSpec((None,), tf.int64),
      tf.TensorSpec((None, 2), tf.int64))).unbatch()
  ds = _parallel_map(ds, _train_preprocess(config))
  ds = ds.batch(per_process, drop_remainder=True)
  if mixing(config):
    ds = _parallel_map(ds, lambda images, labels, params: augment.mix_pairs(
        images, labels, params, config.dataset.num_classes, cfg.mixup_alpha, cfg.cutmix_alpha,
        cfg.cutmix_prob))
  ds = ds.prefetch(cfg.prefetch).with_options(_options(config))
  # Built eagerly (not a generator function) so that config errors surface at this call.
  return ({'image': image, 'label': label} for image, label in ds.as_numpy_iterator())


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
  ds = _parallel_map(ds, _eval_preprocess(config))
  ds = ds.batch(per_process).prefetch(config.input.prefetch).with_options(_options(config))
  return ({'image': image, 'label': label, 'mask': mask} for image, label, mask in ds.as_numpy_iterator())
