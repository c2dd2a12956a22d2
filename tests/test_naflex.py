"""Native aspect ratio (config.input.max_tokens, NaFlex): grids within the budget, patches, masked
attention against the unpadded sequence, per-image position embeddings against the checkpoint
loader's resize, fixed-size models giving their own logits, and NaFlex with RoPE trained through the
launcher on 8 devices and resumed bitwise."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_train import train_in_process
from tests.trained_run import trained_run
from vit_jax.checkpoint import resize_posemb
from vit_jax.errors import UsageError
from vit_jax.models import create_model, model_from_config
from vit_jax.models.attention import explicit_attention, reference_attention
from vit_jax.models.layers import sincos_2d_posemb
from vit_jax.models import naflex

POSEMB = ('Transformer', 'posembed_input', 'pos_embedding')


def patchify(image: np.ndarray, patch: int, max_tokens: int):
  """A NaFlex example of an image whose sides are multiples of `patch`, by plain numpy."""
  rows, columns = image.shape[0] // patch, image.shape[1] // patch
  patches = image.reshape(rows, patch, columns, patch, -1).transpose(0, 2, 1, 3, 4).reshape(rows * columns, -1)
  return {'patches': np.pad(patches, ((0, max_tokens - rows * columns), (0, 0))),
          'grid': np.array([rows, columns], np.int32)}


def stack(examples):
  return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def test_grid_within_budget_keeps_aspect_and_patches_are_row_major():
  import tensorflow as tf
  from vit_jax.data import naflex as data
  for height, width, budget in [(8, 8, 16), (30, 90, 16), (90, 30, 64), (17, 500, 16), (224, 224, 196)]:
    rows, columns = data.grid_for(height, width, 4, budget)
    assert rows * columns <= budget and rows >= 1 and columns >= 1
    assert tuple(data.tf_grid_for(tf.constant(height), tf.constant(width), 4, budget).numpy()) == (rows, columns)
    if min(height, width) * 4 > max(height, width):  # Not extreme: the aspect ratio is kept.
      assert abs(np.log(columns / rows) - np.log(width / height)) < 0.35
  assert data.grid_for(224, 224, 16, 196) == (14, 14) and data.grid_for(8, 8, 4, 16) == (4, 4)
  assert data.grid_for(30, 90, 4, 16) == (2, 6)
  image = np.random.default_rng(0).integers(0, 255, (8, 24, 3)).astype(np.float32)
  example = data.to_patches(tf.constant(image), 4, 16)  # (8, 24) is the grid's size: no resampling.
  expected = patchify(image, 4, 16)
  np.testing.assert_array_equal(example['grid'].numpy(), expected['grid'])
  np.testing.assert_array_equal(example['patches'].numpy(), expected['patches'])
  picture = data.to_images(stack([expected]), 4, 24)[0]
  np.testing.assert_array_equal(picture[8:16], image)  # Back to the image, centred on the canvas.


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_masked_attention_equals_attention_on_the_unpadded_sequence(dtype):
  rng = np.random.default_rng(0)
  lengths = np.array([7, 3, 10])
  q, k, v = (jnp.asarray(rng.standard_normal((3, 10, 2, 8)), dtype) for _ in range(3))
  padded = explicit_attention(q, k, v, lengths=jnp.asarray(lengths))
  _, weights = reference_attention(q, k, v, jnp.asarray(lengths))
  for i, n in enumerate(lengths):
    alone = explicit_attention(q[i:i + 1, :n], k[i:i + 1, :n], v[i:i + 1, :n])
    np.testing.assert_allclose(np.asarray(padded[i, :n], np.float32), np.asarray(alone[0], np.float32),
                               rtol=1e-5 if dtype == jnp.float32 else 1e-2, atol=1e-6)
    assert float(jnp.abs(weights[i, :, :, n:]).max(initial=0.0)) == 0.0  # Padding gets no weight.


def test_position_embeddings_per_image_against_the_loaders_resize():
  """The learned table resized to each image's grid inside the model equals resize_posemb (numpy,
  what loading a checkpoint at another resolution does); sin-cos at the patches' coordinates equals
  the fixed grid's table."""
  rng = np.random.default_rng(0)
  table = rng.standard_normal((1, 1 + 16, 8)).astype(np.float32)
  grids = np.array([[4, 4], [3, 5], [6, 2], [1, 7]], np.int32)
  module = naflex.NaFlexPositionEmbs('learn', (4, 4), 1)
  x = jnp.zeros((4, 1 + 20, 8))
  out = np.asarray(module.apply({'params': {'pos_embedding': table}}, x, jnp.asarray(grids)))
  for i, (rows, columns) in enumerate(grids):
    expected = resize_posemb(table, (int(rows), int(columns)), num_prefix=1, old_grid=(4, 4))[0]
    np.testing.assert_allclose(out[i, :1 + rows * columns], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out[0, :17], table[0])  # The table's own grid: the table itself.
  sincos = naflex.NaFlexPositionEmbs('sincos2d', (4, 4), 1).apply({}, x, jnp.asarray(grids))
  np.testing.assert_allclose(sincos[1, 1:16], sincos_2d_posemb(3, 5, 8)[0], rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(sincos[:, 0]) == 0)  # The class token gets none.


@pytest.mark.parametrize('options', [
    dict(pool='gap', posemb='sincos2d+rope_mixed', num_registers=2),
    dict(pool='map', posemb='learn+rope_axial'),
])
def test_fixed_size_model_gives_its_own_logits_on_naflex_batches(options):
  """A model's parameters fed NaFlex batches, padded and mixed with images of other grids, give the
  fixed-size model's logits on each image: at its training size with the table as it is, at another
  grid with the table resized as the checkpoint loader does."""
  model = create_model('tiny/4', 5, posemb_grid=(4, 4), **options)
  rng = np.random.default_rng(1)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']
  square = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
  wide = rng.standard_normal((1, 8, 24, 3)).astype(np.float32)
  batch = stack([patchify(square[0], 4, 20), patchify(wide[0], 4, 20), patchify(square[1], 4, 20)])
  apply = jax.jit(lambda p, x: model.apply({'params': p}, x)[0])
  logits = apply(params, jax.tree.map(jnp.asarray, batch))
  fixed = apply(params, square)
  np.testing.assert_allclose(logits[::2], fixed, rtol=1e-4, atol=1e-5)
  if 'learn' in options['posemb']:
    params = jax.tree.map(lambda x: x, params)
    table = np.asarray(params['Transformer']['posembed_input']['pos_embedding'])
    params['Transformer']['posembed_input']['pos_embedding'] = resize_posemb(
        table, (2, 6), int(options['pool'] == 'token'), old_grid=(4, 4))
  np.testing.assert_allclose(logits[1], apply(params, wide)[0], rtol=1e-4, atol=1e-5)


def test_naflex_config_checks(tiny_config):
  tiny_config.input.max_tokens = 16
  assert model_from_config(tiny_config).posemb_grid == (4, 4)  # config.input.image_size 16, patch 4.
  tiny_config.input.max_tokens = -1
  with pytest.raises(UsageError, match='max_tokens=-1 is negative'):
    model_from_config(tiny_config)
  tiny_config.input.max_tokens, tiny_config.model.variant = 16, 'Rtiny+tiny/8'
  with pytest.raises(UsageError, match='needs a plain ViT'):
    model_from_config(tiny_config)
  from vit_jax.data import naflex as data
  tiny_config.input.train_crop = 'pad_random'
  tiny_config.input.mixup_alpha = 0.2
  with pytest.raises(UsageError, match="train_crop='pad_random'.*mixup/CutMix"):
    data.check(tiny_config)


def test_fixed_checkpoint_in_a_naflex_model_gives_the_same_predictions(tiny_config):
  """The shared fixed-size run (16 px) evaluated on NaFlex batches of its own 16 patches: the same
  probabilities on all 360 test digits, on 8 devices."""
  from vit_jax.tools import evaluate
  run = trained_run(tiny_config)
  fixed = evaluate.collect_predictions(run)
  flexible = evaluate.collect_predictions(evaluate.at_max_tokens(run, 16))
  assert len(fixed['labels']) == 360
  np.testing.assert_allclose(flexible['probabilities'], fixed['probabilities'], rtol=1e-4, atol=1e-6)
  wider = evaluate.collect_predictions(evaluate.at_max_tokens(run, 36))  # 1.5x: the table resized.
  assert not np.allclose(wider['probabilities'], fixed['probabilities'], atol=1e-3)


def read_params(workdir):
  from vit_jax.checkpoint.run import load_workdir
  return jax.device_get(load_workdir(str(workdir)).params)


def test_naflex_with_rope_trains_through_the_launcher_and_resumes_bitwise(tmp_path, data_dir, run_command):
  """NaFlex batches of 16 patches (the digits on 4x4 grids, a budget of 20: padded and masked) with a
  learned table and mixed RoPE, on 8 devices with FSDP over 2: 4 steps in one run equal the run
  stopped after its checkpoint at step 2 and resumed for 2 more, bit for bit."""
  flags = ('--config.input.max_tokens=20', '--config.model.posemb=learn+rope_mixed', '--config.model.pool=map',
           '--config.mesh.fsdp=2', '--config.mesh.fsdp_min_size=64', '--config.eval_every_steps=4',
           '--config.input.train_crop=random_resized',
           '--config.optimizer.warmup_steps=2')
  straight = train_in_process(run_command, tmp_path / 'straight', data_dir, '--config.total_steps=4', *flags)
  assert straight.returncode == 0, straight.stderr[-3000:]
  assert '8 devices (mesh data=4, fsdp=2)' in straight.stdout
  assert 'padding masked (NaFlex)' in straight.stdout
  assert 'eval at step 4' in straight.stdout
  # The same run stopped after its checkpoint at step 2 (a copy without the later one), resumed.
  shutil.copytree(tmp_path / 'straight', tmp_path / 'resumed')
  shutil.rmtree(tmp_path / 'resumed' / 'checkpoints' / '4')
  second = train_in_process(run_command, tmp_path / 'resumed', data_dir, '--config.total_steps=4', *flags)
  assert second.returncode == 0 and 'Resuming from the checkpoint at step 2' in second.stdout, second.stderr[-3000:]
  a, b = read_params(tmp_path / 'straight'), read_params(tmp_path / 'resumed')
  assert a['Transformer']['encoderblock_0']['MultiHeadDotProductAttention_1']['rope']['freqs'].shape == (2, 2, 8)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  evaluated = run_command('evaluate', '--workdir', str(tmp_path / 'straight'), '--max_tokens', '64',
                          '--out_dir', str(tmp_path / 'eval64'))
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert 'of 360' in evaluated.stdout and os.path.isfile(tmp_path / 'eval64' / 'most_confused.png')
  from PIL import Image
  for name, shape in (('wide.png', (6, 20)), ('tall.png', (30, 8))):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, shape + (3,)).astype(np.uint8)).save(tmp_path / name)
  predicted = run_command('predict', '--workdir', str(tmp_path / 'straight'), '--top_k', '2',
                          str(tmp_path / 'wide.png'), str(tmp_path / 'tall.png'))
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  assert predicted.stdout.count('%') == 4  # Two images of any shape, two classes each.
