"""Non-square inputs: config.input.image_size=(height, width) trains, predicts and fine-tunes,
with position embeddings resized on the 2-D grid."""

import json

import numpy as np
import pytest

from tests.test_train import train_in_process
from tests.trained_run import trained_workdir
from vit_jax.checkpoint import load_for_model, resize_posemb
from vit_jax.checkpoint.npz import flatten_params, load_pretrained
from vit_jax.config.sizes import image_hw
from vit_jax.errors import UsageError
from vit_jax.models import create_model, model_from_config

POSEMB = 'Transformer/posembed_input/pos_embedding'


def test_image_hw_accepts_one_side_or_height_width():
  assert image_hw(384) == (384, 384)
  assert image_hw((384, 512)) == (384, 512)
  assert image_hw([16, 24]) == (16, 24)  # As a config.json stores a tuple.
  assert image_hw('(16, 24)') == image_hw('16,24') == image_hw('16x24') == (16, 24)
  for bad in ((1, 2, 3), 'big', 2.5, (0, 8), True):
    with pytest.raises(ValueError):
      image_hw(bad)


def test_preprocessing_makes_height_by_width():
  import tensorflow as tf
  from vit_jax.data import preprocess
  image = tf.cast(tf.reshape(tf.range(30 * 50 * 3) % 255, (30, 50, 3)), tf.uint8)
  seed = tf.constant([1, 2])
  assert preprocess.resize(image, (16, 24)).shape == (16, 24, 3)
  assert preprocess.central_crop(image, (16, 24), 0.875).shape == (16, 24, 3)
  assert preprocess.random_resized_crop(image, seed, (16, 24)).shape == (16, 24, 3)
  assert preprocess.pad_random_crop(image, seed, (16, 24), 2).shape == (16, 24, 3)
  # A square size is the old behaviour: the short side becomes size / fraction.
  assert preprocess.central_crop(image, 16).shape == (16, 16, 3)


def test_resize_posemb_on_a_non_square_grid():
  rows, cols = np.mgrid[:4, :4]
  linear = np.concatenate([np.full((1, 1, 1), 7.0), (2 * rows + 3 * cols).reshape(1, 16, 1)], axis=1)
  resized = resize_posemb(linear.astype(np.float32), (6, 8), num_prefix=1)
  assert resized.shape == (1, 1 + 48, 1) and resized[0, 0, 0] == 7.0
  # Bilinear with aligned corners reproduces a function linear in (row, column) exactly.
  rows, cols = np.mgrid[:6, :8] * np.array([3 / 5, 3 / 7])[:, None, None]
  np.testing.assert_allclose(resized[0, 1:, 0], (2 * rows + 3 * cols).ravel(), rtol=1e-5, atol=1e-5)
  # From a non-square grid, when it is given.
  rows, cols = np.mgrid[:2, :3]
  small = (rows + 10 * cols).reshape(1, 6, 1).astype(np.float32)
  big = resize_posemb(small, (3, 5), 0, old_grid=(2, 3))
  rows, cols = np.mgrid[:3, :5] * np.array([1 / 2, 2 / 4])[:, None, None]
  np.testing.assert_allclose(big[0, :, 0], (rows + 10 * cols).ravel(), rtol=1e-6)


def test_patch_size_must_divide_each_side(tiny_config):
  tiny_config.input.image_size = (16, 18)
  with pytest.raises(UsageError, match=r"image_size=\(16, 18\) is not divisible by the patch size 4 of 'tiny/4' on each side \(16x18\)"):
    model_from_config(tiny_config)
  tiny_config.input.image_size = (16, 24)
  assert model_from_config(tiny_config).token_grid(16, 24) == (4, 6)
  tiny_config.input.image_size = 'wide'
  with pytest.raises(UsageError, match='config.input.image_size: .* not one or two integers'):
    model_from_config(tiny_config)


def test_square_checkpoint_loads_into_a_non_square_model(tiny_config):
  """The shared square run (tiny/4 at 16 px: a 4x4 grid) into a 16x24 model (4x6)."""
  workdir = trained_workdir(tiny_config)
  square = flatten_params(load_pretrained(workdir))
  model = create_model('tiny/4', 10)
  fitted = flatten_params(load_for_model(workdir, model, (16, 24)))
  assert fitted[POSEMB].shape == (1, 1 + 4 * 6, 32)
  np.testing.assert_array_equal(fitted[POSEMB], resize_posemb(square[POSEMB], (4, 6), 1))
  for key in square:
    if key != POSEMB:
      np.testing.assert_array_equal(fitted[key], square[key], err_msg=key)


def test_launcher_fine_tunes_non_square_from_a_square_run_and_predicts(tiny_config, tmp_path, data_dir, run_command):
  """`--config.input.image_size='(16, 24)'` on the command line, initialised from the square
  run; then predict on image files through the run's own preprocessing."""
  from vit_jax.checkpoint.run import load_workdir
  from vit_jax.tools import predict
  square = trained_workdir(tiny_config)
  workdir = tmp_path / 'wide'
  result = train_in_process(run_command, workdir, data_dir, '--config.total_steps=2',
                            '--config.model.variant=tiny/4', '--config.input.image_size=(16, 24)',
                            f'--config.init.path={square}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'step 2/2' in result.stdout
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['input']['image_size'] == [16, 24]
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert all(np.isfinite(r['train/loss']) for r in rows if 'train/loss' in r)

  run = load_workdir(str(workdir))
  assert run.params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 1 + 24, 32)
  from PIL import Image
  files = []
  for i in range(3):
    path = tmp_path / f'image_{i}.png'
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (20 + i, 30, 3), np.uint8)).save(path)
    files.append(str(path))
  ((_, images, logits, _),) = list(predict.predict_batches(run, files, batch_size=4))
  assert images.shape == (3, 16, 24, 3) and logits.shape == (3, 10)
  assert np.all(np.isfinite(logits))
