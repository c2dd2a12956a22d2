"""Image operations: each augmentation's shape and range, RandAugment, mixup and CutMix."""

import numpy as np
import pytest
import tensorflow as tf

from vit_jax.data import augment
from vit_jax.data import preprocess

OPERATION_NAMES = ['identity', 'autocontrast', 'equalize', 'rotate', 'solarize', 'color', 'posterize',
                   'contrast', 'brightness', 'sharpness', 'shear_x', 'shear_y', 'translate_x', 'translate_y']


def _image(height=24, width=20, seed=0):
  rng = np.random.default_rng(seed)
  # Smooth-ish content with a restricted range, so that autocontrast/equalize have work to do.
  return tf.constant(rng.integers(40, 200, (height, width, 3)).astype(np.float32))


@pytest.mark.parametrize('index', range(augment.NUM_OPERATIONS), ids=OPERATION_NAMES)
@pytest.mark.parametrize('magnitude', [0, 5, 10])
def test_each_randaugment_operation_keeps_shape_and_range(index, magnitude):
  image = _image()
  for sign in (-1.0, 1.0):
    out = augment._operations(magnitude)[index](image, sign).numpy()
    assert out.shape == (24, 20, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 255.0
    if magnitude == 0 and OPERATION_NAMES[index] not in ('autocontrast', 'equalize'):
      np.testing.assert_allclose(out, image.numpy(), atol=1e-3)  # Magnitude 0 changes nothing.


def test_pixel_operations_match_pil():
  pytest.importorskip('PIL')  # Reference implementation only (tensorboard brings pillow).
  from PIL import Image, ImageOps
  image = _image(seed=1)
  pil = Image.fromarray(image.numpy().astype(np.uint8))
  np.testing.assert_array_equal(augment.equalize(image).numpy(), np.asarray(ImageOps.equalize(pil)))
  np.testing.assert_array_equal(augment.posterize(image, 3).numpy(), np.asarray(ImageOps.posterize(pil, 3)))
  np.testing.assert_array_equal(augment.solarize(image, 128.0).numpy(), np.asarray(ImageOps.solarize(pil, 128)))
  np.testing.assert_allclose(augment.autocontrast(image).numpy(), np.asarray(ImageOps.autocontrast(pil)), atol=1)


def test_randaugment_is_a_pure_function_of_the_seed():
  image = _image()
  outputs = [augment.randaugment(image, tf.constant([0, s], tf.int64), 2, 10).numpy() for s in (1, 1, 2, 3, 4)]
  np.testing.assert_array_equal(outputs[0], outputs[1])
  assert any(not np.array_equal(outputs[0], o) for o in outputs[2:])
  for out in outputs:
    assert out.shape == (24, 20, 3) and 0 <= out.min() and out.max() <= 255
  np.testing.assert_array_equal(augment.randaugment(image, tf.constant([0, 1], tf.int64), 0, 10), image)
  with pytest.raises(ValueError, match='magnitude 11'):
    augment.randaugment(image, tf.constant([0, 1], tf.int64), 2, 11)


def test_crops_flip_and_normalization_shapes_and_ranges():
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (37, 50, 3)).astype(np.uint8))
  seed = tf.constant([3, 4], tf.int64)
  for out in (preprocess.random_resized_crop(image, seed, 16), preprocess.central_crop(image, 16, 0.875),
              preprocess.pad_random_crop(image, seed, 16, 2), preprocess.resize(image, 16)):
    assert out.shape == (16, 16, 3) and out.dtype == tf.float32
    assert 0 <= out.numpy().min() and out.numpy().max() <= 255.001
  flipped = preprocess.random_flip(image, seed).numpy()
  assert np.array_equal(flipped, image.numpy()) or np.array_equal(flipped, image.numpy()[:, ::-1])
  scaled = preprocess.value_range(image, -1.0, 1.0).numpy()
  assert scaled.min() >= -1 and scaled.max() <= 1
  np.testing.assert_allclose(preprocess.value_range(tf.constant([0.0, 255.0]), -1, 1), [-1, 1])
  normalized = preprocess.normalize(tf.fill([2, 2, 3], 255.0 * 0.5), (0.5, 0.25, 0.0), (0.5, 0.25, 0.5))
  np.testing.assert_allclose(normalized.numpy()[0, 0], [0.0, 1.0, 1.0], atol=1e-6)


def _pair_batch(batch=8, size=12, num_classes=5):
  rng = np.random.default_rng(0)
  images = tf.constant(rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32))
  labels = tf.constant(rng.integers(0, num_classes, batch).astype(np.int32))
  params = tf.stack([augment.mix_params(tf.constant([7, p], tf.int64), 0.8, 1.0) for p in range(batch)])
  return images, labels, params


@pytest.mark.parametrize('mixup_alpha,cutmix_alpha', [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mix_pairs_mixes_only_neighbours_and_labels_follow_pixels(mixup_alpha, cutmix_alpha):
  images, labels, params = _pair_batch()
  mixed, soft = augment.mix_pairs(images, labels, params, 5, mixup_alpha, cutmix_alpha, 0.5)
  mixed, soft, images, labels = mixed.numpy(), soft.numpy(), images.numpy(), labels.numpy()
  assert mixed.shape == images.shape and soft.shape == (8, 5)
  np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-6)
  assert mixed.min() >= -1 and mixed.max() <= 1
  for k in range(4):
    a, b = images[2 * k], images[2 * k + 1]
    for own, other, out, row, own_label, other_label in (
        (a, b, mixed[2 * k], soft[2 * k], labels[2 * k], labels[2 * k + 1]),
        (b, a, mixed[2 * k + 1], soft[2 * k + 1], labels[2 * k + 1], labels[2 * k])):
      # Every pixel is w * own + (1 - w) * other: recover w (one per pixel).
      weight = np.median((out - other) / (own - other), axis=-1)
      lam = weight.mean()
      expected = np.zeros(5)
      expected[own_label] += lam
      expected[other_label] += 1 - lam
      np.testing.assert_allclose(row, expected, atol=1e-4)  # Labels are mixed like the pixels.
      if not mixup_alpha:  # CutMix: each pixel is wholly one image's.
        assert np.all(np.isclose(weight, 0, atol=1e-4) | np.isclose(weight, 1, atol=1e-4))
      if not cutmix_alpha:  # Mixup: one weight for the whole image.
        np.testing.assert_allclose(weight, lam, atol=1e-4)
