"""A run's model as a TensorFlow SavedModel, converted with jax2tf: for TF Serving and other TF runtimes.

  vit-jax export --workdir DIR --format saved_model --out DIR_OUT [--serving_input uint8]

The SavedModel holds the parameters as variables and one signature,
`serving_default`, whose batch size is free (shape-polymorphic in jax2tf):

  images (batch, height, width, 3)  float32 as the model takes them (after the eval
                                    preprocessing: `config.input.normalization`), or with
                                    `--serving_input uint8` pixels 0..255 of any one size per
                                    batch, resized, centrally cropped and normalised inside the
                                    graph as `vit_jax.data.pipeline.eval_preprocess_fn` does
  -> logits, probabilities          (batch, classes)

`class_names` (a string variable) is an attribute of the loaded object, and
assets.extra/vit_jax.json holds the config, class names and step. The model
is lowered (StableHLO inside the graph) for CPU, CUDA and TPU, so the file
exported on one serves on the others.
"""

import json
import os
from typing import Any

import jax
import numpy as np

from vit_jax.checkpoint.run import Run
from vit_jax.config.sizes import image_hw
from vit_jax.errors import UsageError

SERVING_INPUTS = ('float', 'uint8')
PLATFORMS = ('cpu', 'cuda', 'tpu')


def _serving_module(run: Run, serving_input: str, platforms: tuple[str, ...]) -> Any:
  """A tf.Module holding the parameters as variables and `serve`, the signature function."""
  import tensorflow as tf
  from jax.experimental import jax2tf

  height, width = image_hw(run.config.input.image_size)
  leaves, treedef = jax.tree.flatten(jax.tree.map(np.asarray, jax.device_get(run.params)))

  def forward(params, images):
    return run.model.apply({'params': params}, images, train=False)[0]
  # Parameters keep their shapes; the batch dimension is the one free symbol.
  forward_tf = jax2tf.convert(forward, polymorphic_shapes=[None, f'(b, {height}, {width}, 3)'],
                              with_gradient=False, native_serialization_platforms=platforms)
  module = tf.Module()
  module.weights = [tf.Variable(leaf, trainable=False) for leaf in leaves]  # Flat: tf and jax trees differ.
  module.class_names = tf.Variable(list(run.class_names), trainable=False)  # Saved; a constant is not.

  def logits_of(images):
    logits = forward_tf(jax.tree.unflatten(treedef, list(module.weights)), images)
    return {'logits': logits, 'probabilities': tf.nn.softmax(logits, axis=-1)}

  if serving_input == 'float':
    module.serve = tf.function(logits_of, autograph=False, input_signature=[
        tf.TensorSpec([None, height, width, 3], tf.float32, name='images')])
    return module

  from vit_jax.data import pipeline, preprocess
  config = run.config.input

  def prepare(image):  # uint8 (h, w, 3) -> model input: eval_preprocess_fn after its decode.
    image = preprocess.central_crop(image, config.image_size, config.eval_crop_fraction)
    return pipeline.model_input(image, config)

  def serve_uint8(images):
    model_input = tf.map_fn(prepare, images, fn_output_signature=tf.TensorSpec([height, width, 3], tf.float32))
    return logits_of(model_input)
  module.serve = tf.function(serve_uint8, autograph=False, input_signature=[
      tf.TensorSpec([None, None, None, 3], tf.uint8, name='images')])
  return module


def export_saved_model(run: Run, out: str, serving_input: str = 'float',
                       platforms: tuple[str, ...] = PLATFORMS) -> str:
  """Writes `run`'s model as a SavedModel directory `out` (see the module doc); returns `out`."""
  if serving_input not in SERVING_INPUTS:
    raise UsageError(f'--serving_input={serving_input!r}: use one of {", ".join(SERVING_INPUTS)}.')
  if out.endswith('.npz'):
    raise UsageError(f'--out={out!r}: a SavedModel is a directory; give a path without .npz.')
  if os.path.exists(out) and os.listdir(out):
    raise UsageError(f'--out={out!r} exists and is not empty; give a new directory.')
  import tensorflow as tf

  module = _serving_module(run, serving_input, tuple(platforms))
  tf.saved_model.save(module, out, signatures={'serving_default': module.serve})
  extra = os.path.join(out, 'assets.extra')
  os.makedirs(extra, exist_ok=True)
  meta = {'config': json.loads(run.config.to_json_best_effort()), 'class_names': list(run.class_names),
          'step': run.step, 'ema': run.ema, 'serving_input': serving_input}
  with open(os.path.join(extra, 'vit_jax.json'), 'w') as f:
    json.dump(meta, f, indent=2, sort_keys=True)
    f.write('\n')
  return out
