"""The ViT: published parameter counts, shapes, options, and attention functions."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.models import create_model, parse_variant
from vit_jax.models.vit import reference_attention, stack_blocks, unstack_blocks


def normal(seed: int, shape, dtype=jnp.float32) -> jax.Array:
  """Standard-normal test data drawn by numpy: jax.random compiles a sampler per shape (~0.3 s each here)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


# Published counts with a 1000-class head at 224 px (ViT paper / timm / big_vision).
# g/14 and G/14 (Scaling ViT, Table 2: ~1011M and ~1843M without the head) match
# timm's vit_giant_patch14_224 / vit_gigantic_patch14_224 (1012.61M / 1844.44M).
PUBLISHED_PARAMS = {
    'Ti/16': 5_717_416,
    'S/16': 22_050_664,
    'S/32': 22_878_952,
    'B/16': 86_567_656,
    'B/32': 88_224_232,
    'B/8': 86_576_872,
    'L/16': 304_326_632,
    'H/14': 632_045_800,
    'g/14': 1_012_611_432,
    'G/14': 1_844_440_680,
}


def jit_apply(model, return_attention=False):
  """The model's forward pass, compiled once: much faster than op-by-op dispatch on CPU."""
  return jax.jit(lambda params, images: model.apply({'params': params}, images, return_attention=return_attention))


def count_params(model, image_size):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3))))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize('variant', sorted(PUBLISHED_PARAMS))
def test_published_parameter_counts(variant):
  assert count_params(create_model(variant, 1000), 224) == PUBLISHED_PARAMS[variant]


def test_parameter_names_follow_published_layout():
  model = create_model('tiny/4', 10)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']
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
  images = normal(1, (3, 16, 24, 3))
  variables = jax.jit(model.init)(jax.random.key(0), images)
  logits, out = jax.jit(functools.partial(model.apply, return_attention=True))(variables, images)
  tokens = 4 * 6 + (pool == 'token')
  assert logits.shape == (3, 7)
  assert out['pre_logits'].shape == (3, 32)
  assert out['encoded'].shape == (3, tokens, 32)
  assert len(out['blocks']) == 2 and len(out['attention']) == 2
  assert out['attention'][0].shape == (3, 2, tokens, tokens)
  np.testing.assert_allclose(out['attention'][1].sum(-1), 1.0, rtol=1e-5)
  assert ('cls' in variables['params']) == (pool == 'token')
  assert ('posembed_input' in variables['params']['Transformer']) == (posemb == 'learn')


def test_attention_functions_agree():
  """The model's default (explicit softmax) and another attention function of the same signature,
  XLA's `jax.nn.dot_product_attention` (what cuDNN's path replaces on GPU): same parameters, same
  function, also with qk-norm."""
  q, k, v = normal(0, (3, 2, 5, 37, 4, 16))
  fused = jax.nn.dot_product_attention(q[0], k[0], v[0])
  ref, _ = reference_attention(q[0], k[0], v[0])
  np.testing.assert_allclose(fused, ref, rtol=1e-5, atol=1e-6)

  images = normal(2, (2, 16, 16, 3))
  model = create_model('tiny/4', 10, qk_norm=True)
  params = jax.jit(model.init)(jax.random.key(0), images)['params']
  _, explicit = jit_apply(model)(params, images)
  xla = create_model('tiny/4', 10, qk_norm=True, attention_fn=jax.nn.dot_product_attention)
  xla_params = jax.jit(xla.init)(jax.random.key(0), images)['params']
  jax.tree.map(np.testing.assert_array_equal, xla_params, params)  # Same names, shapes and values.
  _, out = jit_apply(xla)(params, images)
  # The encoded tokens: the logits of a fresh (zero) head would be zero on any path.
  np.testing.assert_allclose(out['encoded'], explicit['encoded'], rtol=1e-5, atol=1e-5)


@functools.lru_cache(maxsize=None)
def tiny_batch_and_params():
  """Two fixed images, their labels, and tiny/4 parameters (5 classes) with a non-zero head, so
  that gradients reach every block. Cached: callers must not modify them."""
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  labels = jnp.array([1, 3])
  params = jax.jit(create_model('tiny/4', 5).init)(jax.random.key(0), images)['params']
  params['head']['kernel'] = jax.random.normal(jax.random.key(3), params['head']['kernel'].shape)
  return images, labels, params


def tiny_loss_and_grads(**model_options):
  """Loss and gradients of tiny/4 built with `model_options` at the same parameters and batch."""
  images, labels, params = tiny_batch_and_params()
  model = create_model('tiny/4', 5, **model_options)

  def loss(p):
    logits = model.apply({'params': p}, images, train=True)[0]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()
  return jax.jit(jax.value_and_grad(loss))(params)


def test_representation_size_adds_pre_logits():
  model = create_model('tiny/4', 10, representation_size=24)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']
  assert params['pre_logits']['kernel'].shape == (32, 24)
  assert params['head']['kernel'].shape == (24, 10)


def test_training_mode_uses_dropout_and_drop_path():
  model = create_model('tiny/4', 10, dropout_rate=0.5, stochastic_depth=0.5, attention_dropout_rate=0.5)
  images = normal(2, (4, 16, 16, 3))
  variables = jax.jit(model.init)(jax.random.key(0), images)
  head = variables['params']['head']
  head['kernel'] = normal(3, head['kernel'].shape)  # Non-zero logits.
  apply = jax.jit(lambda v, key: model.apply(v, images)[0])
  train = jax.jit(lambda v, key: model.apply(v, images, train=True, rngs={'dropout': key})[0])
  eval_a, eval_b = apply(variables, jax.random.key(1)), apply(variables, jax.random.key(2))
  train_a, train_b = train(variables, jax.random.key(1)), train(variables, jax.random.key(2))
  np.testing.assert_array_equal(eval_a, eval_b)
  assert not np.allclose(train_a, train_b)


def test_bfloat16_compute_keeps_float32_params():
  model = create_model('tiny/4', 10, dtype=jnp.bfloat16)
  images = jnp.ones((2, 16, 16, 3))
  variables = jax.jit(model.init)(jax.random.key(0), images)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  logits, out = jax.jit(model.apply)(variables, images)
  assert out['encoded'].dtype == jnp.bfloat16 and logits.dtype == jnp.float32


def test_bad_variant_and_patch_size_errors():
  with pytest.raises(ValueError, match='Unknown model variant'):
    parse_variant('Q/16')
  model = create_model('tiny/5', 10)
  with pytest.raises(ValueError, match='not divisible by the patch size 5'):
    model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def test_scan_keeps_counts_and_matches_loop():
  """nn.scan stacks the same parameters; with them stacked, the outputs are the loop's."""
  assert count_params(create_model('G/14', 1000, scan=True), 224) == PUBLISHED_PARAMS['G/14']
  options = dict(pool='map', num_registers=2, qk_norm=True, layerscale=0.1)
  images = normal(1, (2, 16, 16, 3))
  loop = create_model('tiny/4', 7, **options)
  params = jax.jit(loop.init)(jax.random.key(0), images)['params']
  scanned = create_model('tiny/4', 7, scan=True, remat=True, **options)
  stacked = stack_blocks(params)
  assert stacked['Transformer']['encoderblock']['LayerNorm_0']['scale'].shape == (2, 32)
  assert jax.tree.structure(jax.eval_shape(scanned.init, jax.random.key(0), images)['params']) == (
      jax.tree.structure(stacked))
  a, out_a = jit_apply(loop, True)(params, images)
  b, out_b = jit_apply(scanned, True)(stacked, images)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out_a['attention'][1], out_b['attention'][1], rtol=1e-5, atol=1e-6)
  assert len(out_b['blocks']) == 2
  assert jax.tree.structure(unstack_blocks(stacked)) == jax.tree.structure(params)


def test_remat_and_scan_train_with_stochastic_depth():
  images = normal(1, (4, 16, 16, 3))
  model = create_model('tiny/4', 10, scan=True, remat=True, stochastic_depth=0.5, dropout_rate=0.1)
  params = jax.jit(model.init)(jax.random.key(0), images)['params']
  params['head']['kernel'] = normal(3, params['head']['kernel'].shape)

  @jax.jit
  def loss(p, key):
    return model.apply({'params': p}, images, train=True, rngs={'dropout': key})[0].sum()
  grads = jax.jit(jax.grad(loss))(params, jax.random.key(1))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert not np.isclose(loss(params, jax.random.key(1)), loss(params, jax.random.key(2)))


def test_map_head_layout_and_attention():
  model = create_model('tiny/4', 5, pool='map')
  images = normal(1, (3, 16, 16, 3))
  params = jax.jit(model.init)(jax.random.key(0), images)['params']
  head = params['MAPHead_0']
  assert set(head) == {'probe', 'MultiHeadDotProductAttention_0', 'LayerNorm_0', 'MlpBlock_0'}
  assert head['probe'].shape == (1, 1, 32)
  assert head['MultiHeadDotProductAttention_0']['query']['kernel'].shape == (32, 2, 16)
  assert set(head['MlpBlock_0']) == {'Dense_0', 'Dense_1'} and 'cls' not in params
  forward = jit_apply(model, True)
  logits, out = forward(params, images)
  assert logits.shape == (3, 5) and out['map_attention'].shape == (3, 2, 1, 16)
  np.testing.assert_allclose(out['map_attention'].sum(-1), 1.0, rtol=1e-5)
  # The probe attends: changing a single patch changes the pooled features.
  _, out2 = forward(params, images.at[:, :4, :4].set(3.0))
  assert not np.allclose(out['pre_logits'], out2['pre_logits'])


@pytest.mark.parametrize('pool', ['token', 'gap', 'map'])
def test_register_tokens_order_and_attention(pool):
  model = create_model('tiny/4', 5, pool=pool, num_registers=3)
  images = normal(1, (2, 16, 16, 3))
  params = jax.jit(model.init)(jax.random.key(0), images)['params']
  assert params['registers'].shape == (1, 3, 32)
  # Registers carry no position: the published posemb shape is unchanged.
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 16 + (pool == 'token'), 32)
  assert model.num_prefix_tokens == 3 + (pool == 'token')
  _, out = jit_apply(model, True)(params, images)
  tokens = 16 + model.num_prefix_tokens
  assert out['encoded'].shape == (2, tokens, 32) and out['attention'][0].shape == (2, 2, tokens, tokens)
  if pool == 'gap':  # Mean over the patch tokens only.
    np.testing.assert_allclose(out['pre_logits'], out['encoded'][:, 3:].mean(1), rtol=1e-6)


def test_qk_norm_and_layerscale_parameters():
  model = create_model('tiny/4', 5, qk_norm=True, layerscale=1e-4)
  images = normal(1, (2, 16, 16, 3))
  params = jax.jit(model.init)(jax.random.key(0), images)['params']
  block = params['Transformer']['encoderblock_0']
  attention = block['MultiHeadDotProductAttention_1']
  assert attention['query_ln']['scale'].shape == (16,) and 'bias' not in attention['query_ln']
  assert attention['key_ln']['scale'].shape == (16,)
  np.testing.assert_array_equal(block['layerscale_attention']['scale'], np.full(32, 1e-4, np.float32))
  np.testing.assert_array_equal(block['layerscale_mlp']['scale'], np.full(32, 1e-4, np.float32))
  # LayerScale 0 makes every block the identity: tokens leave as they entered.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if 'layerscale' in jax.tree_util.keystr(path) else x, params)
  _, out = jit_apply(model)(params, images)
  np.testing.assert_allclose(out['blocks'][0], out['blocks'][1], rtol=1e-6)


def test_fused_and_reference_agree_on_cross_attention_with_relative_error():
  """The 1e-5 relative bound of the issue, for self- and cross-attention (MAP head shapes)."""
  q = normal(0, (4, 1, 8, 32))
  k, v = normal(1, (2, 4, 197, 8, 32))
  fused = jax.jit(jax.nn.dot_product_attention)(q, k, v)
  ref, weights = jax.jit(reference_attention)(q, k, v)
  assert weights.shape == (4, 8, 1, 197)
  assert float(jnp.linalg.norm(fused - ref) / jnp.linalg.norm(ref)) < 1e-5


def test_remat_policies_keep_loss_and_gradients():
  """Every remat setting computes the same function: only what is stored for the backward pass differs."""
  expected_loss, expected_grads = tiny_loss_and_grads(remat=False)
  for remat in (True, 'none', 'full', 'nothing_saveable', 'dots_saveable',
                'dots_with_no_batch_dims_saveable'):
    loss, grads = tiny_loss_and_grads(remat=remat)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6, err_msg=str(remat))
    # Recomputed activations may be fused and summed in another order: float32 rounding, on the scale
    # of the largest gradient (a few units here), also in gradients that are nearly zero.
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(expected_grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale, err_msg=str(remat)),
                 grads, expected_grads)


def test_unknown_remat_policy_is_a_clear_error():
  model = create_model('tiny/4', 5, remat='dots')
  with pytest.raises(ValueError, match="Unknown remat policy 'dots'; use False, True or one of none, full"):
    model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  from vit_jax.config import defaults
  from vit_jax.errors import UsageError
  from vit_jax.models import model_from_config
  config = defaults.get_config()
  config.model.remat = 'dot_saveable'
  with pytest.raises(UsageError, match="config.model.remat: Unknown remat policy 'dot_saveable'.*dots_saveable"):
    model_from_config(config)


# A direct float64 numpy ViT, as google-research/vision_transformer's models_vit.py computes it
# (pre-LN blocks, flax LayerNorm's epsilon 1e-6, nn.gelu = the tanh approximation).
NUMPY_GELUS = {
    'tanh': lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
    'exact': lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2))),
}


def numpy_layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p['scale'] + p['bias']


def numpy_encoder_block(x, p, gelu):
  a = p['MultiHeadDotProductAttention_1']
  y = numpy_layer_norm(x, p['LayerNorm_0'])
  q, k, v = (np.einsum('btd,dhk->bthk', y, a[n]['kernel']) + a[n]['bias'] for n in ('query', 'key', 'value'))
  logits = np.einsum('bqhk,bshk->bhqs', q, k) / np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  x = x + np.einsum('bqhk,hkd->bqd', np.einsum('bhqs,bshk->bqhk', weights, v), a['out']['kernel']) + a['out']['bias']
  m = p['MlpBlock_3']
  y = NUMPY_GELUS[gelu](numpy_layer_norm(x, p['LayerNorm_2']) @ m['Dense_0']['kernel'] + m['Dense_0']['bias'])
  return x + y @ m['Dense_1']['kernel'] + m['Dense_1']['bias']


def numpy_vit(images, params, patch, gelu='tanh'):
  """(logits, each block's output) of a class-token ViT with learned position embeddings."""
  params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  b, h, w, c = images.shape
  x = np.asarray(images, np.float64).reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, patch * patch * c)
  x = x @ params['embedding']['kernel'].reshape(-1, params['embedding']['kernel'].shape[-1])
  x = x + params['embedding']['bias']
  t = params['Transformer']
  cls = np.broadcast_to(params['cls'], (b, 1, x.shape[-1]))
  x = np.concatenate([cls, x], 1) + t['posembed_input']['pos_embedding']
  blocks = []
  for i in range(len([k for k in t if k.startswith('encoderblock_')])):
    x = numpy_encoder_block(x, t[f'encoderblock_{i}'], gelu)
    blocks.append(x)
  x = numpy_layer_norm(x, t['encoder_norm'])
  return x[:, 0] @ params['head']['kernel'] + params['head']['bias'], blocks


def max_relative(actual, expected):
  return float(np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max())


def test_default_gelu_is_the_published_models_tanh():
  """One block and the logits of the default model equal the numpy models_vit.py computation
  (tanh GELU) to 1e-5 relative in float32; the exact (erf) GELU is measurably off it."""
  images = normal(1, (2, 16, 16, 3))
  model = create_model('tiny/4', 10)
  assert model.gelu == 'tanh'
  params = jax.jit(model.init)(jax.random.key(0), images)['params']
  params['head']['kernel'] = normal(3, params['head']['kernel'].shape)
  logits, out = jit_apply(model)(params, images)
  expected_logits, expected_blocks = numpy_vit(images, params, 4, 'tanh')
  assert max_relative(out['blocks'][0], expected_blocks[0]) < 1e-5
  assert max_relative(logits, expected_logits) < 1e-5
  # The exact GELU (same parameters) matches its own reference, and is ~2e-4 away from the tanh one.
  exact_logits, _ = jit_apply(create_model('tiny/4', 10, gelu='exact'))(params, images)
  assert max_relative(exact_logits, numpy_vit(images, params, 4, 'exact')[0]) < 1e-5
  assert max_relative(exact_logits, expected_logits) > 5e-5


def test_gelu_tanh_values_and_gradient_are_flax_nn_gelu():
  from vit_jax.models.layers import gelu_tanh
  x = jnp.linspace(-8, 8, 4001)
  np.testing.assert_allclose(gelu_tanh(x), jax.nn.gelu(x, approximate=True), rtol=1e-6, atol=1e-6)
  grad = jax.vmap(jax.grad(gelu_tanh))(x)
  np.testing.assert_allclose(grad, jax.vmap(jax.grad(lambda x: jax.nn.gelu(x, approximate=True)))(x),
                             rtol=1e-5, atol=1e-5)
  assert gelu_tanh(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_unknown_gelu_is_a_clear_error():
  with pytest.raises(ValueError, match="Unknown gelu 'erf'; use one of tanh, exact"):
    create_model('tiny/4', 5, gelu='erf').init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  from vit_jax.config import defaults
  from vit_jax.errors import UsageError
  from vit_jax.models import model_from_config
  config = defaults.get_config()
  config.model.gelu = 'approximate'
  with pytest.raises(UsageError, match="config.model.gelu='approximate'; use one of tanh, exact"):
    model_from_config(config)
