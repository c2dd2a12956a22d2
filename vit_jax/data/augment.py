"""RandAugment, mixup and CutMix as plain, stateless TensorFlow functions.

RandAugment (Cubuk et al. 2020) applies `num_layers` operations drawn uniformly
from 14, each at one global `magnitude` (0..10, where 10 is the strongest; we
use the "increasing" parametrisation in which every operation gets stronger
with the magnitude, as timm and big_vision do). Images are float32 0..255 of
shape (height, width, 3); every operation returns that shape and range.

Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) mix two examples. To keep
the result independent of the number of processes, an example is only ever
mixed with its neighbour in the global stream: positions 2k and 2k+1 form a
pair (both always in the same process, since each process's slice starts at an
even position), and the pair's random draws come from the seed of position 2k.
The per-example draws are made in `mix_params` (one stateless draw per
example, inside the per-example map); `mix_pairs` then mixes a batch.
"""

import math

import tensorflow as tf

MAX_MAGNITUDE = 10.0
GREY = 128.0  # Fill value of the geometric operations (as PIL/timm use for RandAugment).


def _clip(image: tf.Tensor) -> tf.Tensor:
  return tf.clip_by_value(image, 0.0, 255.0)


def _blend(image: tf.Tensor, degenerate: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL ImageEnhance: factor 0 gives `degenerate`, 1 the image, >1 extrapolates."""
  return _clip(degenerate + factor * (image - degenerate))


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """(height, width, 1) luma with PIL's weights."""
  return tf.reduce_sum(image * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True)


def brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  return _blend(image, tf.zeros_like(image), factor)


def color(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  return _blend(image, tf.broadcast_to(_grayscale(image), tf.shape(image)), factor)


def contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  return _blend(image, tf.fill(tf.shape(image), tf.reduce_mean(_grayscale(image))), factor)


def sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """Blends with PIL's 3x3 smoothing filter; the one-pixel border is left as is."""
  kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], 'VALID')[0]
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  border = tf.pad(tf.zeros_like(smooth[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]], constant_values=1.0)
  degenerate = border * image + (1.0 - border) * smooth
  return _blend(image, degenerate, factor)


def solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
  """Inverts the pixels at or above `threshold`."""
  return tf.where(image < threshold, image, 255.0 - image)


def posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
  """Keeps the `bits` most significant bits of each 8-bit value."""
  shift = tf.cast(8 - bits, tf.uint8)
  pixels = tf.cast(tf.round(image), tf.uint8)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(pixels, shift), shift), tf.float32)


def autocontrast(image: tf.Tensor) -> tf.Tensor:
  """Stretches each channel to the full 0..255 range (a flat channel is left as is)."""
  low = tf.reduce_min(image, axis=[0, 1])
  high = tf.reduce_max(image, axis=[0, 1])
  scale = tf.where(high > low, 255.0 / tf.maximum(high - low, 1e-6), 1.0)
  offset = tf.where(high > low, low, 0.0)
  return _clip((image - offset) * scale)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """Histogram equalisation of each channel, with PIL's lookup table."""
  pixels = tf.cast(tf.round(image), tf.int32)

  def channel(values):  # (height, width) int32
    hist = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
    last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))
    step = (tf.reduce_sum(hist) - last) // 255
    lut = (tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1)
    lut = tf.clip_by_value(lut, 0, 255)
    return tf.where(step > 0, tf.gather(lut, values), values)

  return tf.cast(tf.stack([channel(pixels[..., c]) for c in range(3)], axis=-1), tf.float32)


def _transform(image: tf.Tensor, matrix) -> tf.Tensor:
  """Samples output pixel (x, y) from input (a0 x + a1 y + a2, b0 x + b1 y + b2); grey fill."""
  transform = tf.cast(tf.stack(list(matrix) + [0.0, 0.0]), tf.float32)[None]
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform, output_shape=tf.shape(image)[:2],
      fill_value=GREY, interpolation='BILINEAR', fill_mode='CONSTANT')[0]


def rotate(image: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
  """Rotates about the image centre."""
  angle = degrees * math.pi / 180.0
  height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  cy, cx = (height - 1) / 2, (width - 1) / 2
  cos, sin = tf.cos(angle), tf.sin(angle)
  return _transform(image, [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy])


def shear_x(image: tf.Tensor, shear: tf.Tensor) -> tf.Tensor:
  return _transform(image, [1.0, shear, 0.0, 0.0, 1.0, 0.0])


def shear_y(image: tf.Tensor, shear: tf.Tensor) -> tf.Tensor:
  return _transform(image, [1.0, 0.0, 0.0, shear, 1.0, 0.0])


def translate_x(image: tf.Tensor, pixels: tf.Tensor) -> tf.Tensor:
  return _transform(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0])


def translate_y(image: tf.Tensor, pixels: tf.Tensor) -> tf.Tensor:
  return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels])


def _operations(magnitude: float):
  """The 14 RandAugment operations as fn(image, sign) at this magnitude (0..10)."""
  level = magnitude / MAX_MAGNITUDE
  enhance = lambda op: lambda image, sign: op(image, 1.0 + sign * 0.9 * level)  # noqa: E731

  def translate(op):
    return lambda image, sign: op(image, sign * 0.45 * level * tf.cast(tf.shape(image)[0], tf.float32))

  return [
      lambda image, sign: image,  # Identity.
      lambda image, sign: autocontrast(image),
      lambda image, sign: equalize(image),
      lambda image, sign: rotate(image, sign * 30.0 * level),
      lambda image, sign: solarize(image, 256.0 - 256.0 * level),
      enhance(color),
      lambda image, sign: posterize(image, 8 - int(4 * level)),
      enhance(contrast),
      enhance(brightness),
      enhance(sharpness),
      lambda image, sign: shear_x(image, sign * 0.3 * level),
      lambda image, sign: shear_y(image, sign * 0.3 * level),
      translate(translate_x),
      translate(translate_y),
  ]


NUM_OPERATIONS = 14


def randaugment(image: tf.Tensor, seed: tf.Tensor, num_layers: int, magnitude: float) -> tf.Tensor:
  """Applies `num_layers` random operations at `magnitude` (0..10) to a 0..255 image.

  Each layer draws its operation and its sign (direction of rotations, shears,
  translations and enhancements) from `seed`, so the result is a pure function
  of (image, seed). Returns float32 in 0..255 of the input's shape.
  """
  if not 0 <= magnitude <= MAX_MAGNITUDE:
    raise ValueError(f'RandAugment magnitude {magnitude} is outside 0..{MAX_MAGNITUDE:g}.')
  image = _clip(tf.cast(image, tf.float32))
  operations = _operations(magnitude)
  assert len(operations) == NUM_OPERATIONS
  for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num_layers)) if num_layers else []:
    draws = tf.random.stateless_uniform([2], layer_seed)
    index = tf.minimum(tf.cast(draws[0] * NUM_OPERATIONS, tf.int32), NUM_OPERATIONS - 1)
    sign = tf.where(draws[1] < 0.5, -1.0, 1.0)
    branches = [lambda op=op: tf.ensure_shape(op(image, sign), image.shape) for op in operations]
    image = tf.switch_case(index, branches)
  return image


# Layout of the per-example mixing draws made by `mix_params`.
_SWITCH, _MIXUP_LAMBDA, _CUTMIX_LAMBDA, _CENTER_Y, _CENTER_X = range(5)
NUM_MIX_PARAMS = 5


def _beta(seed: tf.Tensor, alpha: float) -> tf.Tensor:
  """One stateless draw from Beta(alpha, alpha); 1.0 (no mixing) when alpha is 0."""
  if alpha <= 0:
    return tf.constant(1.0)
  gammas = tf.random.stateless_gamma([2], seed, alpha=alpha)
  return gammas[0] / tf.maximum(gammas[0] + gammas[1], 1e-12)


def mix_params(seed: tf.Tensor, mixup_alpha: float, cutmix_alpha: float) -> tf.Tensor:
  """This example's mixing draws, float32 (NUM_MIX_PARAMS,); only even positions' are used."""
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  uniform = tf.random.stateless_uniform([3], seeds[0])
  return tf.stack([uniform[0], _beta(seeds[1], mixup_alpha), _beta(seeds[2], cutmix_alpha),
                   uniform[1], uniform[2]])


def mix_pairs(images: tf.Tensor, labels: tf.Tensor, params: tf.Tensor, num_classes: int,
              mixup_alpha: float, cutmix_alpha: float, cutmix_prob: float) -> tuple[tf.Tensor, tf.Tensor]:
  """Mixes examples 2k and 2k+1 of a batch; returns images and soft labels (batch, num_classes).

  images: (batch, height, width, channels) float; labels: (batch,) int; params:
  (batch, NUM_MIX_PARAMS) from `mix_params`. When both alphas are positive, a
  pair uses CutMix with probability `cutmix_prob` and mixup otherwise. Both
  examples of a pair get the same weight: the first is lam * a + (1 - lam) * b,
  the second lam * b + (1 - lam) * a, and the labels are mixed like the pixels
  (for CutMix, lam is the fraction of the image left uncut).
  """
  shape = tf.shape(images)
  height, width = shape[1], shape[2]
  pair_images = tf.reshape(images, tf.concat([[-1, 2], shape[1:]], 0))  # (pairs, 2, h, w, c)
  first, second = pair_images[:, 0], pair_images[:, 1]
  params = params[0::2]  # (pairs, NUM_MIX_PARAMS): the draws of position 2k.

  if cutmix_alpha > 0 and mixup_alpha > 0:
    use_cutmix = params[:, _SWITCH] < cutmix_prob
  else:
    use_cutmix = tf.fill(tf.shape(params)[:1], cutmix_alpha > 0)

  # CutMix box: side sqrt(1 - lam) of the image's, centred uniformly, clipped to the image.
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  ratio = tf.sqrt(1.0 - params[:, _CUTMIX_LAMBDA])
  cy, cx = params[:, _CENTER_Y] * h, params[:, _CENTER_X] * w
  top = tf.clip_by_value(tf.round(cy - ratio * h / 2), 0.0, h)
  bottom = tf.clip_by_value(tf.round(cy + ratio * h / 2), 0.0, h)
  left = tf.clip_by_value(tf.round(cx - ratio * w / 2), 0.0, w)
  right = tf.clip_by_value(tf.round(cx + ratio * w / 2), 0.0, w)
  ys = tf.range(h)[None, :, None]
  xs = tf.range(w)[None, None, :]
  inside = ((ys >= top[:, None, None]) & (ys < bottom[:, None, None]) &
            (xs >= left[:, None, None]) & (xs < right[:, None, None]))  # (pairs, h, w)
  cutmix_lambda = 1.0 - (bottom - top) * (right - left) / (h * w)

  lam = tf.where(use_cutmix, cutmix_lambda, params[:, _MIXUP_LAMBDA])  # (pairs,)
  keep = tf.where(use_cutmix[:, None, None], 1.0 - tf.cast(inside, tf.float32),
                  lam[:, None, None] * tf.ones_like(inside, tf.float32))[..., None]  # (pairs, h, w, 1)
  keep = tf.cast(keep, images.dtype)
  mixed = tf.stack([keep * first + (1 - keep) * second, keep * second + (1 - keep) * first], axis=1)

  one_hot = tf.reshape(tf.one_hot(labels, num_classes), [-1, 2, num_classes])
  lam = lam[:, None]
  soft = tf.stack([lam * one_hot[:, 0] + (1 - lam) * one_hot[:, 1],
                   lam * one_hot[:, 1] + (1 - lam) * one_hot[:, 0]], axis=1)
  return tf.reshape(mixed, shape), tf.reshape(soft, [-1, num_classes])
