"""Muon (config.optimizer.name='muon'): the orthogonalised update of the encoder's kernels against an SVD,
AdamW's update everywhere else, and the scan layout's stacked kernels as independent matrices.

Training through the launcher and a bitwise resume with Muon: tests/test_flexivit.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax.config import defaults
from vit_jax.models import create_model
from vit_jax.models.vit import stack_blocks, unstack_blocks
from vit_jax.training import muon, optim
from vit_jax.checkpoint.npz import flatten_params

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic Newton-Schulz coefficients (optax's default).
LEARNING_RATE, WEIGHT_DECAY, RMS = 0.1, 0.05, 0.2


def muon_config():
  config = defaults.get_config()
  opt = config.optimizer
  opt.name, opt.schedule, opt.warmup_steps, opt.grad_clip_norm = 'muon', 'constant', 0, 0.0
  opt.learning_rate, opt.weight_decay, opt.muon_consistent_rms = LEARNING_RATE, WEIGHT_DECAY, RMS
  return config


def params_and_grads(**options):
  model = create_model('tiny/4', 5, **options)
  params = jax.device_get(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params'])
  rng = np.random.default_rng(1)
  grads = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
  return params, grads


def orthogonalised(g: np.ndarray) -> np.ndarray:
  """Five Newton-Schulz steps on G / |G|_F, computed on its singular values: the iteration is an odd
  polynomial of G, so it keeps U and V and maps each singular value s through the scalar polynomial."""
  u, s, vt = np.linalg.svd(g.astype(np.float64), full_matrices=False)
  s = s / np.linalg.norm(g)
  a, b, c = NS_COEFFS
  for _ in range(5):
    s = a * s + b * s ** 3 + c * s ** 5
  return (u * s) @ vt


def as_matrix(name: str, x: np.ndarray) -> np.ndarray:
  """The matrix a kernel multiplies by: (dim, heads * head_dim) for q/k/v, (heads * head_dim, dim) for out."""
  return x.reshape(-1, x.shape[-1]) if name.endswith('/out/kernel') else x.reshape(x.shape[0], -1)


def test_encoder_kernels_take_the_orthogonalised_update_and_the_rest_adamw():
  config = muon_config()
  params, grads = params_and_grads()
  tx = optim.create_optimizer(config)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  adamw = optax.adamw(LEARNING_RATE, b1=config.optimizer.b1, b2=config.optimizer.b2, weight_decay=WEIGHT_DECAY,
                      mask=optim.decay_mask)
  adamw_updates, _ = adamw.update(grads, adamw.init(params), params)
  flat_p, flat_g, flat_u, flat_a = map(flatten_params, (params, grads, updates, adamw_updates))
  on_muon = sorted(k for k in flat_p if k.startswith('Transformer/encoderblock_') and k.endswith('/kernel'))
  assert len(on_muon) == 2 * 6  # Per block: query, key, value, out and the MLP's two kernels.
  for name in on_muon:
    # First step: the Nesterov momentum is a positive multiple of the gradient, which the
    # normalisation by |G|_F removes.
    matrix = as_matrix(name, flat_g[name])
    scale = RMS * np.sqrt(max(matrix.shape))
    expected = -LEARNING_RATE * (scale * orthogonalised(matrix) + WEIGHT_DECAY * as_matrix(name, flat_p[name]))
    np.testing.assert_allclose(as_matrix(name, flat_u[name]), expected, rtol=2e-3, atol=2e-5, err_msg=name)
    if 'MlpBlock' in name:  # (32, 64): singular values well away from 0 end near 1.
      s = np.linalg.svd(as_matrix(name, flat_u[name]) / (-LEARNING_RATE * scale) -
                        WEIGHT_DECAY / scale * as_matrix(name, flat_p[name]), compute_uv=False)
      assert 0.5 < s.min() and s.max() < 1.5, s
  for name in sorted(set(flat_p) - set(on_muon)):  # Embedding, posemb, cls, norms, biases, head.
    np.testing.assert_allclose(flat_u[name], flat_a[name], rtol=1e-6, atol=1e-9, err_msg=name)


def test_scan_layout_orthogonalises_each_layer_on_its_own():
  config = muon_config()
  params, grads = params_and_grads()
  tx = optim.create_optimizer(config)
  per_block, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  stacked_params, stacked_grads = stack_blocks(params), stack_blocks(grads)
  labels = muon.muon_labels(stacked_params)['Transformer']['encoderblock']
  assert labels['MlpBlock_3']['Dense_0']['kernel'] == 'muon' and labels['LayerNorm_0']['scale'] == 'adamw'
  stacked, _ = jax.jit(tx.update)(stacked_grads, tx.init(stacked_params), stacked_params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6), unstack_blocks(
      jax.device_get(stacked)), jax.device_get(per_block))


def test_the_map_head_stays_on_adamw():
  model = create_model('tiny/4', 5, pool='map')
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']
  labels = flatten_params(muon.muon_labels(params))
  assert {k for k, v in labels.items() if v == 'muon'} == {
      k for k in labels if k.startswith('Transformer/encoderblock_') and k.endswith('/kernel')}
  assert labels['MAPHead_0/MultiHeadDotProductAttention_0/query/kernel'] == 'adamw'
