"""The ViT: published parameter counts, shapes, options, and the two attention paths."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.models import create_model, parse_variant
from vit_jax.models.vit import reference_attention

# Published counts with a 1000-class head at 224 px (ViT paper / timm / big_vision).
PUBLISHED_PARAMS = {
    'Ti/16': 5_717_416,
    'S/16': 22_050_664,
    'S/32': 22_878_952,
    'B/16': 86_567_656,
    'B/32': 88_224_232,
    'B/8': 86_576_872,
    'L/16': 304_326_632,
    'H/14': 632_045_800,
}


def count_params(model, image_size):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3))))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize('variant', sorted(PUBLISHED_PARAMS))
def test_published_parameter_counts(variant):
  assert count_params(create_model(variant, 1000), 224) == PUBLISHED_PARAMS[variant]


def test_parameter_names_follow_published_layout():
  model = create_model('tiny/4', 10)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']
  assert set(params) == {'embedding', 'cls', 'Transformer', 'head'}
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 17, 32)
  block = params['Transformer']['encoderblock_0']
  assert set(block) == {'LayerNorm_0', 'MultiHeadDotProductAttention_1', 'LayerNorm_2', 'MlpBlock_3'}
  assert block['MultiHeadDotProductAttention_1']['query']['kernel'].shape == (32, 2, 16)
  assert block['MultiHeadDotProductAttention_1']['out']['kernel'].shape == (2, 16, 32)
  assert 'encoder_norm' in params['Transformer']


@pytest.mark.parametrize('pool,posemb', [('token', 'learn'), ('gap', 'learn'), ('token', 'sincos2d'),
                                         ('gap', 'none')])
def test_forward_shapes_and_intermediates(pool, posemb):
  model = create_model('tiny/4', 7, pool=pool, posemb=posemb)
  images = jax.random.normal(jax.random.key(1), (3, 16, 24, 3))
  variables = model.init(jax.random.key(0), images)
  logits, out = model.apply(variables, images, return_attention=True)
  tokens = 4 * 6 + (pool == 'token')
  assert logits.shape == (3, 7)
  assert out['pre_logits'].shape == (3, 32)
  assert out['encoded'].shape == (3, tokens, 32)
  assert len(out['blocks']) == 2 and len(out['attention']) == 2
  assert out['attention'][0].shape == (3, 2, tokens, tokens)
  np.testing.assert_allclose(out['attention'][1].sum(-1), 1.0, rtol=1e-5)
  assert ('cls' in variables['params']) == (pool == 'token')
  assert ('posembed_input' in variables['params']['Transformer']) == (posemb == 'learn')


def test_fused_and_reference_attention_agree():
  q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 5, 37, 4, 16))
  fused = jax.nn.dot_product_attention(q[0], k[0], v[0])
  ref, _ = reference_attention(q[0], k[0], v[0])
  np.testing.assert_allclose(fused, ref, rtol=1e-5, atol=1e-6)

  images = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
  fused_model = create_model('tiny/4', 10, attention='fused')
  variables = fused_model.init(jax.random.key(0), images)
  a, _ = fused_model.apply(variables, images)
  b, _ = create_model('tiny/4', 10, attention='reference').apply(variables, images)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_representation_size_adds_pre_logits():
  model = create_model('tiny/4', 10, representation_size=24)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']
  assert params['pre_logits']['kernel'].shape == (32, 24)
  assert params['head']['kernel'].shape == (24, 10)


def test_training_mode_uses_dropout_and_drop_path():
  model = create_model('tiny/4', 10, dropout_rate=0.5, stochastic_depth=0.5, attention_dropout_rate=0.5)
  images = jax.random.normal(jax.random.key(2), (4, 16, 16, 3))
  variables = model.init(jax.random.key(0), images)
  head = variables['params']['head']
  head['kernel'] = jax.random.normal(jax.random.key(3), head['kernel'].shape)  # Non-zero logits.
  eval_a, _ = model.apply(variables, images)
  eval_b, _ = model.apply(variables, images)
  train_a, _ = model.apply(variables, images, train=True, rngs={'dropout': jax.random.key(1)})
  train_b, _ = model.apply(variables, images, train=True, rngs={'dropout': jax.random.key(2)})
  np.testing.assert_array_equal(eval_a, eval_b)
  assert not np.allclose(train_a, train_b)


def test_bfloat16_compute_keeps_float32_params():
  model = create_model('tiny/4', 10, dtype=jnp.bfloat16)
  images = jnp.ones((2, 16, 16, 3))
  variables = model.init(jax.random.key(0), images)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  logits, out = model.apply(variables, images)
  assert out['encoded'].dtype == jnp.bfloat16 and logits.dtype == jnp.float32


def test_bad_variant_and_patch_size_errors():
  with pytest.raises(ValueError, match='Unknown model variant'):
    parse_variant('Q/16')
  model = create_model('tiny/5', 10)
  with pytest.raises(ValueError, match='not divisible by the patch size 5'):
    model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
