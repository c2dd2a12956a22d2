"""Image operations as plain TensorFlow functions, composed by input_pipeline.

Random operations are stateless: each takes a `seed` tensor of shape (2,), so
that an example's augmentation depends only on the run's seed and the
example's position in the global stream, never on the device layout.
"""

import tensorflow as tf

from vit_jax.config.sizes import image_hw


def plain_graph(fn):
  """`fn` for `Dataset.map` as written, without AutoGraph's rewrite.

  AutoGraph turns Python control flow on tensors into graph ops by
  re-parsing and transpiling each map function: about 1 s of every run's
  start on a 2-core CPU (docs/performance.md). The preprocessing here
  branches only on Python config values and uses tf.cond/tf.switch_case/
  tf.where for data-dependent choices, so the traced graph is the same
  without it (tests/test_input_pipeline.py). The pipeline's maps and the
  image-folder builder's decode check use it.
  """
  return tf.autograph.experimental.do_not_convert(fn)


# `size` below is one side (a square) or (height, width), as `config.input.image_size`.


def decode(encoded: tf.Tensor, channels: int = 3) -> tf.Tensor:
  """Decodes PNG/JPEG/GIF/BMP bytes to uint8 (height, width, channels)."""
  image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
  image.set_shape([None, None, channels])
  return image


def random_resized_crop(image: tf.Tensor, seed: tf.Tensor, size, min_area: float = 0.08,
                        aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tf.Tensor:
  """Inception-style crop: a random box of 'min_area'..100% area, resized to `size`.

  `aspect_ratio` (width / height) is relative to the target's, so that a
  non-square target gets boxes of about its own shape.
  """
  height, width = image_hw(size)
  aspect_ratio = (aspect_ratio[0] * width / height, aspect_ratio[1] * width / height)
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.zeros([1, 0, 4]), seed=seed,
      area_range=(min_area, 1.0), aspect_ratio_range=aspect_ratio,
      min_object_covered=0.0, max_attempts=10, use_image_if_no_bounding_boxes=True)
  image = tf.slice(image, begin, crop_size)
  return resize(image, size)


def pad_random_crop(image: tf.Tensor, seed: tf.Tensor, size, padding: int) -> tf.Tensor:
  """Resizes to `size`, zero-pads by `padding`, takes a random crop of `size`."""
  height, width = image_hw(size)
  image = resize(image, size)
  image = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
  return tf.image.stateless_random_crop(image, [height, width, tf.shape(image)[-1]], seed=seed)


def resize(image: tf.Tensor, size) -> tf.Tensor:
  """Bilinear resize to `size` (no-op when already that size); returns float32."""
  height, width = image_hw(size)
  image = tf.cast(image, tf.float32)
  shape = tf.shape(image)
  same = tf.logical_and(tf.equal(shape[0], height), tf.equal(shape[1], width))
  return tf.cond(same, lambda: image,
                 lambda: tf.image.resize(image, [height, width], method='bilinear', antialias=True))


def central_crop(image: tf.Tensor, size, crop_fraction: float = 1.0) -> tf.Tensor:
  """Resizes (keeping the aspect ratio) to just cover `size` / crop_fraction, then takes the
  central `size`: for a square, the short side becomes size / crop_fraction."""
  height, width = image_hw(size)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = tf.maximum(height / crop_fraction / shape[0], width / crop_fraction / shape[1])
  new_shape = tf.maximum(tf.cast(tf.math.ceil(shape * scale), tf.int32), [height, width])
  image = tf.image.resize(tf.cast(image, tf.float32), new_shape, method='bilinear', antialias=True)
  top = (new_shape[0] - height) // 2
  left = (new_shape[1] - width) // 2
  return tf.image.crop_to_bounding_box(image, top, left, height, width)


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Mirrors left-right with probability 1/2."""
  return tf.image.stateless_random_flip_left_right(image, seed=seed)


def value_range(image: tf.Tensor, low: float, high: float) -> tf.Tensor:
  """Maps pixel values 0..255 linearly to low..high (float32)."""
  return tf.cast(image, tf.float32) * ((high - low) / 255.0) + low


def normalize(image: tf.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> tf.Tensor:
  """Maps pixel values 0..255 to (value / 255 - mean) / std per channel (float32).

  `mean` and `std` are in 0..1 units, e.g. ImageNet's (0.485, 0.456, 0.406) and
  (0.229, 0.224, 0.225).
  """
  mean = tf.constant(mean, tf.float32)
  std = tf.constant(std, tf.float32)
  return (tf.cast(image, tf.float32) / 255.0 - mean) / std
