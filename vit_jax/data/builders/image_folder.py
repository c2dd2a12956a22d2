"""The user's own images: a folder with one sub-folder per class, read by random access.

    PATH/cat/001.jpg, PATH/dog/xyz.png, ...          split by config.dataset.test_fraction
    PATH/train/cat/001.jpg, PATH/test/cat/002.jpg     pre-split: each top-level folder is a split

A folder counts as pre-split when it has a `train` sub-folder; its other
sub-folders (`test`, `validation`, ...) are further splits, and the classes are
the sub-folders of `train`. Otherwise the images of each class are split in a
fixed, seed-independent way: sorted by path, shuffled with a constant seed,
and the first `round(test_fraction * n)` go to `test`, the rest to `train`.
Labels are the indices of the sorted class names.

Why a random-access source rather than a tfds builder: `ImageFolderSource`
has the interface of the tfds `array_record` data sources the pipeline already
reads (`len()`, `__getitems__(indices)` returning dicts of encoded image bytes
and an integer label), so the ordering, per-process slicing and evaluation
padding are exactly the same code for both. A builder would copy every image
into array_record files first (a second copy on disk, and a re-build whenever
the folder changes), for no gain in a pipeline that reads files by index.

Every file with an image extension is decoded once while indexing (in
parallel, by tf.data); the files that do not decode are skipped and counted in
a warning, so training never meets a corrupt file. The index is cached per
process, so the train and eval splits share one scan.
"""

import dataclasses
import functools
import logging
import os

import numpy as np

from vit_jax.errors import UsageError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.bmp')
SPLIT_SEED = 0  # Fixed, so the train/test split never depends on config.seed.


class ImageFolderSource:
  """Random access to (encoded image, label) pairs of a list of files."""

  def __init__(self, paths: list[str], labels: list[int]):
    self.paths = list(paths)
    self.labels = np.asarray(labels, dtype=np.int64)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict:
    with open(self.paths[index], 'rb') as f:
      return {'image': f.read(), 'label': int(self.labels[index])}

  def __getitems__(self, indices) -> list[dict]:
    return [self[int(i)] for i in indices]


@dataclasses.dataclass(frozen=True)
class FolderIndex:
  """The readable images of a folder, by split, and what was skipped."""
  root: str
  class_names: tuple[str, ...]
  splits: dict  # split name -> (paths, labels)
  skipped: tuple[str, ...]  # Files with an image extension that do not decode.


def _subfolders(path: str) -> list[str]:
  return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith('.'))


def _images(folder: str) -> list[str]:
  """Image files under `folder` (recursively), sorted."""
  found = []
  for directory, subdirs, files in os.walk(folder):
    subdirs[:] = sorted(d for d in subdirs if not d.startswith('.'))
    found += [os.path.join(directory, f) for f in files
              if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.')]
  return sorted(found)


def is_presplit(root: str) -> bool:
  return os.path.isdir(os.path.join(root, 'train'))


def class_names(root: str) -> list[str]:
  """The class names of an image folder (cheap: lists folders, reads no image)."""
  return _subfolders(os.path.join(root, 'train') if is_presplit(root) else root)


def _decodable(paths: list[str]) -> np.ndarray:
  """Boolean mask: which files decode as images (decoded in parallel by tf.data)."""
  import tensorflow as tf  # Only needed while indexing; keeps `--help` light.

  from vit_jax.data.preprocess import plain_graph

  if not paths:
    return np.zeros(0, bool)

  def check(path, index):
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    tf.debugging.assert_positive(tf.size(image))
    return index

  ds = tf.data.Dataset.from_tensor_slices((paths, tf.range(len(paths), dtype=tf.int64)))
  ds = ds.map(plain_graph(check), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.ignore_errors()
  ok = np.zeros(len(paths), bool)
  ok[list(ds.as_numpy_iterator())] = True
  return ok


def index_folder(root: str, test_fraction: float) -> FolderIndex:
  """Scans `root` (once per process): its classes, its splits and its unreadable files.

  Raises UsageError for a missing or empty folder, or fewer than 2 classes.
  """
  return _scan(os.path.abspath(root) if root else '', test_fraction)


@functools.lru_cache(maxsize=8)
def _scan(root: str, test_fraction: float) -> FolderIndex:
  if not root:
    raise UsageError('config.dataset.folder is empty; run with --config configs/image_folder.py:PATH '
                     '(PATH holds one sub-folder per class; their number sets config.dataset.num_classes), '
                     'or set both --config.dataset.folder=PATH and --config.dataset.num_classes=N.')
  if not os.path.isdir(root):
    raise UsageError(f'Image folder {root!r} does not exist; give a folder with one sub-folder of images '
                     'per class, as --config configs/image_folder.py:PATH (or --config.dataset.folder=PATH).')
  names = class_names(root)
  if len(names) < 2:
    where = os.path.join(root, 'train') if is_presplit(root) else root
    raise UsageError(f'Image folder {where!r} has {len(names)} class sub-folder(s) '
                     f'({", ".join(names) or "none"}); a classifier needs at least 2: '
                     'put the images of each class in its own sub-folder.')
  label_of = {name: i for i, name in enumerate(names)}

  candidates = []  # (split or None, path, label)
  if is_presplit(root):
    for split in _subfolders(root):
      for name in _subfolders(os.path.join(root, split)):
        if name not in label_of:
          raise UsageError(f'Class {name!r} of split {split!r} in {root!r} is not a class of train/ '
                           f'({", ".join(names)}); add it to train/ or remove it.')
        candidates += [(split, p, label_of[name]) for p in _images(os.path.join(root, split, name))]
  else:
    for name in names:
      candidates += [(None, p, label_of[name]) for p in _images(os.path.join(root, name))]
  if not candidates:
    raise UsageError(f'Image folder {root!r} holds no images ({", ".join(IMAGE_EXTENSIONS)}) in its '
                     'class sub-folders.')

  ok = _decodable([p for _, p, _ in candidates])
  skipped = tuple(p for (_, p, _), good in zip(candidates, ok) if not good)
  kept = [c for c, good in zip(candidates, ok) if good]
  if skipped:
    logging.warning('Image folder %s: skipped %d of %d files that do not decode as images (e.g. %s).',
                    root, len(skipped), len(candidates), ', '.join(skipped[:3]))

  splits = {}
  if is_presplit(root):
    for split, path, label in kept:
      splits.setdefault(split, ([], []))
      splits[split][0].append(path)
      splits[split][1].append(label)
  else:
    if not 0 <= test_fraction < 1:
      raise UsageError(f'config.dataset.test_fraction={test_fraction} must be in [0, 1).')
    splits = {'train': ([], []), 'test': ([], [])}
    for label in range(len(names)):
      paths = [p for _, p, l in kept if l == label]
      order = np.random.default_rng([SPLIT_SEED, label]).permutation(len(paths))
      num_test = round(test_fraction * len(paths))
      for rank, i in enumerate(order):
        split = 'test' if rank < num_test else 'train'
        splits[split][0].append(paths[i])
        splits[split][1].append(label)
  counts = ', '.join(f'{name} {len(paths)}' for name, (paths, _) in splits.items())
  logging.info('Image folder %s: %d classes; %s images.', root, len(names), counts)
  return FolderIndex(root, tuple(names), splits, skipped)


def open_split(root: str, split: str, test_fraction: float) -> tuple[ImageFolderSource, list[str]]:
  """The random-access source of one split of an image folder, and the class names."""
  index = index_folder(root, test_fraction)
  if split not in index.splits:
    raise UsageError(f'Image folder {root!r} has no split {split!r}; its splits are '
                     f'{", ".join(index.splits)}. Set config.dataset.train_split / eval_split.')
  paths, labels = index.splits[split]
  return ImageFolderSource(paths, labels), list(index.class_names)
