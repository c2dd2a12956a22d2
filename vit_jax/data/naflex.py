"""Native aspect ratio (NaFlex): images -> patch batches within a token budget.

With `config.input.max_tokens` = N, each image is resized, its aspect ratio
kept, to the largest grid of (rows, columns) patches with rows * columns <= N
(`grid_for`), cut into patches in row-major order, each flattened in (row,
column, channel) order, and zero-padded to N patches: `{'patches': (N, p * p *
3), 'grid': (2,)}`, the NaFlex batch that any ViT takes (vit_jax/models/naflex.py).
An image that already has a grid's size is not resampled, so an image of a
fixed-size model's training size gives that model's own input.

Training: 'resize' takes the whole image; 'random_resized' first crops a random
box of `crop_min_area`..100% of the area with the image's own aspect ratio;
then flips. Evaluation takes the central `eval_crop_fraction` of each side.
"""

import math

import ml_collections
import numpy as np
import tensorflow as tf

from vit_jax.data import preprocess
from vit_jax.errors import UsageError


def patch_size(config: ml_collections.ConfigDict) -> int:
  """The patch side in pixels of config.model.variant (a plain ViT: NaFlex refuses hybrids)."""
  from vit_jax.models.variants import parse_variant
  try:
    return parse_variant(config.model.variant)['patch_size']
  except ValueError as e:
    raise UsageError(f'config.model.variant: {e}') from None


def grid_for(height: int, width: int, patch: int, max_tokens: int) -> tuple[int, int]:
  """(rows, columns) of the largest patch grid of the image's aspect ratio within `max_tokens`
  (numpy's twin of `tf_grid_for`, for tests and single images)."""
  scale = math.sqrt(max_tokens * patch * patch / (height * width))
  rows = max(1, math.floor(height * scale / patch + 1e-6))
  columns = max(1, math.floor(width * scale / patch + 1e-6))
  rows = min(rows, max_tokens)
  return rows, min(columns, max_tokens // rows)


def tf_grid_for(height: tf.Tensor, width: tf.Tensor, patch: int, max_tokens: int) -> tf.Tensor:
  """`grid_for` on tensors: (2,) int32 (rows, columns)."""
  h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  scale = tf.sqrt(max_tokens * patch * patch / (h * w))
  rows = tf.maximum(1, tf.cast(tf.floor(h * scale / patch + 1e-6), tf.int32))
  columns = tf.maximum(1, tf.cast(tf.floor(w * scale / patch + 1e-6), tf.int32))
  rows = tf.minimum(rows, max_tokens)
  return tf.stack([rows, tf.minimum(columns, max_tokens // rows)])


def to_patches(image: tf.Tensor, patch: int, max_tokens: int, normalize=None) -> dict[str, tf.Tensor]:
  """Resizes (bilinear, antialiased; not at all when it has the size) to its `tf_grid_for` grid,
  applies `normalize` (pixels -> model values, as the fixed-size pipeline does after resizing) and
  returns {'patches': (max_tokens, patch * patch * channels) float32 zero-padded, 'grid': (2,) int32}."""
  shape = tf.shape(image)
  grid = tf_grid_for(shape[0], shape[1], patch, max_tokens)
  size = grid * patch
  image = tf.cast(image, tf.float32)
  same = tf.reduce_all(tf.equal(shape[:2], size))
  image = tf.cond(same, lambda: image,
                  lambda: tf.image.resize(image, size, method='bilinear', antialias=True))
  if normalize is not None:
    image = normalize(image)
  channels = image.shape[-1]
  patches = tf.reshape(image, [grid[0], patch, grid[1], patch, channels])
  patches = tf.reshape(tf.transpose(patches, [0, 2, 1, 3, 4]), [-1, patch * patch * channels])
  patches = tf.pad(patches, [[0, max_tokens - grid[0] * grid[1]], [0, 0]])
  patches.set_shape([max_tokens, patch * patch * channels])
  return {'patches': patches, 'grid': grid}


def random_crop_keeping_aspect(image: tf.Tensor, seed: tf.Tensor, min_area: float) -> tf.Tensor:
  """A random box of `min_area`..100% of the image's area, of the image's own aspect ratio."""
  area_seed, top_seed, left_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  side = tf.sqrt(tf.random.stateless_uniform([], area_seed, min_area, 1.0))
  size = tf.maximum(tf.cast(tf.round(shape * side), tf.int32), 1)
  room = tf.shape(image)[:2] - size
  top = tf.cast(tf.floor(tf.random.stateless_uniform([], top_seed) * tf.cast(room[0] + 1, tf.float32)), tf.int32)
  left = tf.cast(tf.floor(tf.random.stateless_uniform([], left_seed) * tf.cast(room[1] + 1, tf.float32)), tf.int32)
  crop = tf.slice(image, [tf.minimum(top, room[0]), tf.minimum(left, room[1]), 0], [size[0], size[1], -1])
  crop.set_shape([None, None, image.shape[-1]])
  return crop


def central_fraction(image: tf.Tensor, fraction: float) -> tf.Tensor:
  """The central `fraction` of each side (the whole image at 1)."""
  if fraction >= 1.0:
    return image
  shape = tf.shape(image)[:2]
  size = tf.maximum(tf.cast(tf.round(tf.cast(shape, tf.float32) * fraction), tf.int32), 1)
  offset = (shape - size) // 2
  crop = tf.slice(image, [offset[0], offset[1], 0], [size[0], size[1], -1])
  crop.set_shape([None, None, image.shape[-1]])
  return crop


def check(config: ml_collections.ConfigDict) -> None:
  """Raises UsageError for input options that NaFlex batches do not support (yet)."""
  cfg = config.input
  unsupported = []
  if cfg.train_crop not in ('resize', 'random_resized'):
    unsupported.append(f"config.input.train_crop={cfg.train_crop!r} (use 'resize' or 'random_resized')")
  if cfg.randaugment.num_layers:
    unsupported.append('RandAugment (config.input.randaugment.num_layers=0)')
  if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
    unsupported.append('mixup/CutMix (config.input.mixup_alpha=0, cutmix_alpha=0)')
  if unsupported:
    raise UsageError(f'config.input.max_tokens={cfg.max_tokens} (NaFlex) does not support '
                     f'{"; ".join(unsupported)}; change these or set max_tokens=0.')


def train_preprocess(config: ml_collections.ConfigDict, model_input):
  """fn(encoded, label, seed) -> (NaFlex example, label) for training; `model_input` normalises pixels."""
  check(config)
  cfg, patch = config.input, patch_size(config)

  def fn(encoded, label, seed):
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = preprocess.decode(encoded)
    if cfg.train_crop == 'random_resized':
      image = random_crop_keeping_aspect(image, crop_seed, cfg.crop_min_area)
    if cfg.flip:
      image = preprocess.random_flip(image, flip_seed)
    return to_patches(image, patch, cfg.max_tokens, lambda x: model_input(x, cfg)), tf.cast(label, tf.int32)

  return fn


def eval_preprocess(config: ml_collections.ConfigDict, model_input):
  """fn(encoded image bytes) -> NaFlex example, evaluation's deterministic preprocessing."""
  cfg, patch = config.input, patch_size(config)

  def fn(encoded):
    image = central_fraction(preprocess.decode(encoded), cfg.eval_crop_fraction)
    return to_patches(image, patch, cfg.max_tokens, lambda x: model_input(x, cfg))

  return fn


def to_images(batch: dict[str, np.ndarray], patch: int, side: int) -> np.ndarray:
  """NaFlex examples back to pictures for display: each image's grid of patches, scaled (nearest)
  to fit a (side, side) canvas, centred on zeros. Returns (batch, side, side, channels)."""
  patches, grids = np.asarray(batch['patches']), np.asarray(batch['grid'])
  channels = patches.shape[-1] // (patch * patch)
  out = np.zeros((len(patches), side, side, channels), patches.dtype)
  for i, (rows, columns) in enumerate(grids):
    image = patches[i, :rows * columns].reshape(rows, columns, patch, patch, channels)
    image = image.transpose(0, 2, 1, 3, 4).reshape(rows * patch, columns * patch, channels)
    scale = side / max(image.shape[:2])
    h, w = max(1, int(image.shape[0] * scale)), max(1, int(image.shape[1] * scale))
    rows_at = np.minimum((np.arange(h) / scale).astype(int), image.shape[0] - 1)
    columns_at = np.minimum((np.arange(w) / scale).astype(int), image.shape[1] - 1)
    top, left = (side - h) // 2, (side - w) // 2
    out[i, top:top + h, left:left + w] = image[rows_at][:, columns_at]
  return out
