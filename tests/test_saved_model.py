"""The SavedModel export: loaded with tf.saved_model.load, it gives the JAX logits at any batch size."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_models import normal
from vit_jax.checkpoint.run import Run
from vit_jax.errors import UsageError
from vit_jax.models import model_from_config
from vit_jax.tools import saved_model


@pytest.fixture(scope='module')
def run():
  """The quickstart model at the tiny size with random parameters and a random (not zero) head."""
  from configs import quickstart
  config = quickstart.get_config()
  config.model.variant = 'tiny/4'
  for key in ('hidden_size', 'num_layers', 'mlp_dim', 'num_heads'):
    config.model[key] = None
  model = model_from_config(config)
  params = jax.jit(model.init)(jax.random.key(3), jnp.zeros((1, 16, 16, 3)))['params']
  params['head']['kernel'] = normal(4, params['head']['kernel'].shape)  # O(1) logits.
  return Run(config, model, params, [str(d) for d in range(10)], step=6)


def jax_logits(run, images):
  return np.asarray(jax.jit(lambda p, x: run.model.apply({'params': p}, x, train=False)[0])(run.params, images))


def test_float_input_gives_the_jax_logits_for_two_batch_sizes(run, tmp_path):
  import tensorflow as tf
  out = saved_model.export_saved_model(run, str(tmp_path / 'saved'))
  loaded = tf.saved_model.load(out)
  serve = loaded.signatures['serving_default']
  rng = np.random.default_rng(0)
  for batch in (1, 5):
    images = rng.uniform(-1, 1, (batch, 16, 16, 3)).astype(np.float32)
    outputs = serve(images=tf.constant(images))
    expected = jax_logits(run, images)
    assert np.abs(expected).max() > 0.1  # Not trivially close.
    np.testing.assert_allclose(outputs['logits'].numpy(), expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(outputs['probabilities'].numpy().sum(-1), 1.0, rtol=1e-5)
  assert [n.decode() for n in loaded.class_names.numpy()] == run.class_names
  meta = json.loads((tmp_path / 'saved/assets.extra/vit_jax.json').read_text())
  assert meta['step'] == 6 and meta['config']['model']['variant'] == 'tiny/4' and meta['serving_input'] == 'float'
  with pytest.raises(UsageError, match='exists and is not empty'):
    saved_model.export_saved_model(run, out)


def test_uint8_input_includes_the_eval_preprocessing(run, tmp_path):
  import tensorflow as tf
  from vit_jax.data import pipeline
  out = saved_model.export_saved_model(run, str(tmp_path / 'saved'), serving_input='uint8')
  serve = tf.saved_model.load(out).signatures['serving_default']
  rng = np.random.default_rng(1)
  preprocess = pipeline.eval_preprocess_fn(run.config)
  for batch, size in ((2, (8, 8)), (3, (24, 40))):  # Upscaled digits' size, and a wide image to crop.
    pixels = rng.integers(0, 256, (batch, *size, 3), dtype=np.uint8)
    # What evaluation feeds the model: the same pixels through the pipeline's preprocessing of files.
    model_input = np.stack([preprocess(tf.io.encode_png(p)).numpy() for p in pixels])
    logits = serve(images=tf.constant(pixels))['logits'].numpy()
    np.testing.assert_allclose(logits, jax_logits(run, model_input), atol=1e-5, rtol=1e-5)


def test_bad_options_are_usage_errors(run, tmp_path):
  with pytest.raises(UsageError, match="--serving_input='int8': use one of float, uint8"):
    saved_model.export_saved_model(run, str(tmp_path / 'a'), serving_input='int8')
  with pytest.raises(UsageError, match='a SavedModel is a directory'):
    saved_model.export_saved_model(run, str(tmp_path / 'a.npz'))
