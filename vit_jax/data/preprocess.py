"""Image operations as plain TensorFlow functions, composed by input_pipeline.

Random operations are stateless: each takes a `seed` tensor of shape (2,), so
that an example's augmentation depends only on the run's seed and the
example's position in the global stream, never on the device layout.
"""

import tensorflow as tf


def decode(encoded: tf.Tensor, channels: int = 3) -> tf.Tensor:
  """Decodes PNG/JPEG/GIF/BMP bytes to uint8 (height, width, channels)."""
  image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
  image.set_shape([None, None, channels])
  return image


def random_resized_crop(image: tf.Tensor, seed: tf.Tensor, size: int, min_area: float = 0.08,
                        aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tf.Tensor:
  """Inception-style crop: a random box of 'min_area'..100% area, resized to size x size."""
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.zeros([1, 0, 4]), seed=seed,
      area_range=(min_area, 1.0), aspect_ratio_range=aspect_ratio,
      min_object_covered=0.0, max_attempts=10, use_image_if_no_bounding_boxes=True)
  image = tf.slice(image, begin, crop_size)
  return resize(image, size)


def pad_random_crop(image: tf.Tensor, seed: tf.Tensor, size: int, padding: int) -> tf.Tensor:
  """Resizes to size x size, zero-pads by `padding`, takes a random size x size crop."""
  image = resize(image, size)
  image = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
  return tf.image.stateless_random_crop(image, [size, size, tf.shape(image)[-1]], seed=seed)


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bilinear resize to size x size (no-op when already that size); returns float32."""
  image = tf.cast(image, tf.float32)
  shape = tf.shape(image)
  same = tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size))
  return tf.cond(same, lambda: image,
                 lambda: tf.image.resize(image, [size, size], method='bilinear', antialias=True))


def central_crop(image: tf.Tensor, size: int, crop_fraction: float = 1.0) -> tf.Tensor:
  """Resizes the short side to size / crop_fraction, then takes the central size x size."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = (size / crop_fraction) / tf.reduce_min(shape)
  new_shape = tf.cast(tf.math.ceil(shape * scale), tf.int32)
  image = tf.image.resize(tf.cast(image, tf.float32), new_shape, method='bilinear', antialias=True)
  top = (new_shape[0] - size) // 2
  left = (new_shape[1] - size) // 2
  return tf.image.crop_to_bounding_box(image, top, left, size, size)


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
