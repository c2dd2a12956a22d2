"""Autodiff in both modes on every model family, and the CPU train step's rules against plain autodiff.

The model (vit_jax/models/) is plain JAX: `jax.jvp`, `jax.linearize` and
forward-over-reverse Hessian-vector products work on ViTs with token, gap and
MAP pooling, registers, qk-norm, LayerScale, hybrids, `scan`, `remat`, 2-D RoPE
and NaFlex batches (padding masked), in
float32 and bfloat16, and agree with reverse mode (and, in float32, with
finite differences). The XLA:CPU rules of vit_jax/cpu/kernels.py, which only
the CPU train step uses (vit_jax/training/platform.py), give autodiff's values
and gradients.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.cpu import kernels
from vit_jax.models import create_model
from vit_jax.models.attention import explicit_attention


def normal(seed: int, shape, dtype=jnp.float32) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


# One model per row, together covering every family and option: (variant, options).
FAMILIES = {
    'token+registers+qk_norm+layerscale': ('tiny/4', dict(pool='token', num_registers=2, qk_norm=True,
                                                          layerscale=0.5)),
    'map+scan+remat+layerscale': ('tiny/4', dict(pool='map', scan=True, remat=True, layerscale=0.5)),
    'hybrid+gap+remat_policy': ('Rtiny+tiny/8', dict(pool='gap', remat='dots_saveable')),
    # NaFlex batches (padded, masked, the table resized per image) with learned 2-D RoPE.
    'naflex+rope_mixed+learn+gap+registers+scan': ('tiny/4', dict(
        posemb='learn+rope_mixed', pool='gap', num_registers=1, scan=True, posemb_grid=(4, 4))),
}


def naflex_batch(images: jax.Array) -> dict:
  """Two 16 px images as a NaFlex batch padded to 20 patches: the first on its 4x4 grid, the
  second's first 15 patches on a 3x5 one."""
  patches = images.reshape(2, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 48)
  return {'patches': jnp.pad(patches, ((0, 0), (0, 4), (0, 0))), 'grid': jnp.array([[4, 4], [3, 5]])}


def model_loss(variant, dtype, options, params=None):
  """(loss(params), params, a tangent of the params): cross-entropy of two 16 px images, at
  parameters with a non-zero head (`params` if given: a model's parameters are float32 in any
  compute dtype, so one initialisation serves both)."""
  model = create_model(variant, 5, dtype=dtype, **options)
  images = normal(1, (2, 16, 16, 3))
  if params is None:
    params = jax.jit(model.init)(jax.random.key(0), images)['params']
    params['head']['kernel'] = normal(3, params['head']['kernel'].shape)
  inputs = naflex_batch(images) if options.get('posemb_grid') else images
  labels = jnp.array([1, 3])
  leaves, tree = jax.tree.flatten(params)
  scale = 1 / np.sqrt(sum(x.size for x in leaves))  # A unit-norm direction.
  tangent = jax.tree.unflatten(tree, [normal(i, x.shape) * scale for i, x in enumerate(leaves)])

  def loss(p):
    logits = model.apply({'params': p}, inputs)[0]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()
  return loss, params, tangent


def dot(a, b) -> jax.Array:
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def relative(a, b) -> float:
  return float(np.linalg.norm(flat(a) - flat(b)) / np.linalg.norm(flat(b)))


def derivatives(loss):
  """A jitted `(params, t, shift) ->` the loss and J t by jax.linearize, and (gradient, H t) by
  jax.jvp of jax.grad (forward-over-reverse), at params + shift t: one program serves the point
  itself (shift 0, which adds exactly 0) and the two ends of a central difference."""
  @jax.jit
  def compute(p, t, shift):
    p = jax.tree.map(lambda a, b: a + shift * b, p, t)
    value, linear = jax.linearize(loss, p)
    grads, hvp = jax.jvp(jax.grad(loss), (p,), (t,))
    return {'loss': value, 'jt': linear(t), 'grads': grads, 'hvp': hvp}
  return compute


def finite_differences(compute, p, t, eps):
  """Central differences along t of the loss and of J t, by `derivatives`' program run at p + eps t
  and p - eps t."""
  plus, minus = compute(p, t, eps), compute(p, t, -eps)
  return (plus['loss'] - minus['loss']) / (2 * eps), (plus['jt'] - minus['jt']) / (2 * eps)


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_forward_mode_linearize_and_hvp_agree_with_reverse_mode_and_finite_differences(family):
  """float32, along a random unit direction t: J t (linearize) equals the reverse-mode gradient . t
  and central differences of the loss; t . H t (H t by jvp of grad) equals central differences of
  J t. bfloat16 compute (float32 params), along float32's gradient: J t against its own reverse
  mode, gradient and H t against float32's, at bfloat16's precision."""
  variant, options = FAMILIES[family]
  loss, params, tangent = model_loss(variant, jnp.float32, options)
  compute = derivatives(loss)
  f32 = compute(params, tangent, 0.0)
  finite_jt, finite_tht = finite_differences(compute, params, tangent, eps=1e-3)
  reverse = float(dot(f32['grads'], tangent))
  assert abs(reverse) > 1e-3  # Not a degenerate direction.
  np.testing.assert_allclose(f32['jt'], reverse, rtol=1e-4)
  np.testing.assert_allclose(finite_jt, reverse, rtol=1e-2)
  np.testing.assert_allclose(float(dot(f32['hvp'], tangent)), finite_tht, rtol=2e-2)

  # bfloat16 along float32's gradient: J t is then |g|^2-like, free of the cancellation that a random
  # direction's sum over all parameters would turn bfloat16 rounding into.
  loss, params, _ = model_loss(variant, jnp.bfloat16, options, params)
  bf16 = derivatives(loss)(params, f32['grads'], 0.0)
  np.testing.assert_allclose(bf16['jt'], float(dot(bf16['grads'], f32['grads'])), rtol=5e-2)
  # bfloat16's rounding through the layers (the hybrid's ResNet most): gradients within 15% of
  # float32's, H t within 30%; a missing or wrong term would be far off.
  assert relative(bf16['grads'], f32['grads']) < 0.15
  hvp_error = relative(bf16['hvp'], compute(params, f32['grads'], 0.0)['hvp'])
  assert hvp_error < 0.3, hvp_error


def test_cpu_train_steps_model_is_reverse_mode_only():
  """What docs/model.md says: the CPU rules are custom_vjp functions, so jax.jvp of the CPU train
  step's model raises when lowered, while the plain model's lowers (nothing is compiled)."""
  images = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  plain = create_model('tiny/4', 5)
  cpu = plain.clone(dot_general=kernels.projection_dot_general(True, False), attention_fn=kernels.attention)
  params = jax.eval_shape(plain.init, jax.random.key(0), images)['params']

  def jvp(model):
    return jax.jit(lambda p, x: jax.jvp(lambda p: model.apply({'params': p}, x)[0], (p,), (p,))).lower(
        params, images)
  assert jvp(plain).out_info[1].shape == (2, 5)
  with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
    jvp(cpu)


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize('queries,keys', [(37, 37), (1, 50)])
def test_cpu_attention_rule_matches_autodiff(dtype, tol, queries, keys):
  """`kernels.attention` (the CPU train step's attention): the explicit attention's values and
  autodiff's gradients, for self- and cross-attention shapes."""
  q = normal(0, (2, queries, 3, 16), dtype)  # (batch, tokens, heads, head_dim)
  k, v = normal(1, (2, 2, keys, 3, 16), dtype)
  d_out = normal(2, (2, queries, 3, 16), dtype)

  @functools.partial(jax.jit, static_argnums=0)
  def value_and_grads(attention):
    out, vjp = jax.vjp(attention, q, k, v)
    return (out,) + vjp(d_out)
  for name, a, e in zip(('out', 'd_q', 'd_k', 'd_v'), value_and_grads(kernels.attention),
                        value_and_grads(explicit_attention)):
    assert a.dtype == e.dtype == dtype, name
    a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
    assert np.linalg.norm(a - e) / np.linalg.norm(e) < tol, name


@pytest.mark.parametrize('x_shape,w_shape,contract', [
    ((2, 5, 8), (8, 24), 1),      # Dense, wide output: x is the narrower weight-gradient operand.
    ((2, 5, 24), (24, 8), 1),     # Dense, narrow output: g is.
    ((2, 5, 3, 4), (3, 4, 8), 2),  # DenseGeneral over the (heads, head_dim) axes, as `out`.
])
def test_cpu_projection_rule_matches_lax(x_shape, w_shape, contract):
  """The CPU train step's projection `dot_general` (kernels.dense_backward): lax.dot_general's
  values and autodiff's gradients; other contractions pass through to lax.dot_general."""
  dot_general = kernels.projection_dot_general(True, False)
  x, w = normal(0, x_shape), normal(1, w_shape)
  numbers = ((tuple(range(len(x_shape) - contract, len(x_shape))), tuple(range(contract))), ((), ()))
  g = normal(2, x_shape[:-contract] + w_shape[contract:])

  def value_and_grads(dot):
    out, vjp = jax.vjp(lambda x, w: dot(x, w, numbers), x, w)
    return (out,) + vjp(g)
  for a, e in zip(value_and_grads(dot_general), value_and_grads(jax.lax.dot_general)):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)
  a, b = normal(3, (2, 5, 8)), normal(4, (2, 8, 4))
  batched = (((2,), (1,)), ((0,), (0,)))
  np.testing.assert_array_equal(dot_general(a, b, batched), jax.lax.dot_general(a, b, batched))


def test_cpu_train_steps_model_trains_the_plain_model():
  """The model as the CPU train step builds it (vit_jax/training/platform.py, with CPU_RULES) has
  the plain model's loss and gradients, and the plain model's parameters."""
  from vit_jax.config import defaults
  from vit_jax.training import platform
  config = defaults.get_config()
  config.model.variant, config.input.image_size, config.dataset.num_classes = 'tiny/4', 16, 5
  config.model.pool, config.model.num_registers = 'map', 1
  loss, params, _ = model_loss('tiny/4', jnp.float32, dict(pool='map', num_registers=1))
  cpu, line = platform.platform_model(create_model('tiny/4', 5, pool='map', num_registers=1), config, 'cpu')
  assert (cpu.attention_fn is kernels.attention) == ('attention_backward' in platform.CPU_RULES), line
  assert (cpu.dot_general is not None) == ('dense_backward' in platform.CPU_RULES)  # float32: no bfloat16 rule.
  images, labels = normal(1, (2, 16, 16, 3)), jnp.array([1, 3])

  def cpu_loss(p):
    logits = cpu.apply({'params': p}, images)[0]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()
  (a, grads_a), (b, grads_b) = jax.jit(lambda p: (jax.value_and_grad(loss)(p), jax.value_and_grad(cpu_loss)(p)))(
      params)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_a))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6 * scale), grads_a, grads_b)


def cpu_dot_operand_types(hlo: str) -> list[str]:
  """'lhs x rhs -> out' element types of every dot in a compiled XLA:CPU program's text."""
  types = []
  for computation in re.split(r'\n(?=\S)', hlo):
    for dot in re.finditer(r'= (\w+)\[[^\]]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)', computation):
      operands = [re.search(r'%' + re.escape(name) + r' = (\w+)\[', computation).group(1)
                  for name in dot.group(2, 3)]
      types.append(f'{operands[0]} x {operands[1]} -> {dot.group(1)}')
  return types


def test_bfloat16_dot_rule_multiplies_in_bfloat16_and_is_used_only_where_the_cpu_can(monkeypatch, tmp_path):
  """XLA:CPU converts a bfloat16 product that returns bfloat16 to float32; asked for float32 it keeps
  the operands in bfloat16 (YNNPACK's kernel, fast with AVX512_BF16 or AMX, slower without:
  docs/performance.md). The rule asks that way and rounds as before; the CPU step uses it for a
  bfloat16 model only on such CPUs."""
  x, w = normal(0, (64, 48), jnp.bfloat16), normal(1, (48, 96), jnp.bfloat16)
  numbers = (((1,), (0,)), ((), ()))
  rule = kernels.projection_dot_general(False, True)
  compiled = jax.jit(lambda x, w: rule(x, w, numbers)).lower(x, w).compile()
  assert cpu_dot_operand_types(compiled.as_text()) == ['bf16 x bf16 -> f32']
  plain = jax.jit(lambda x, w: jax.lax.dot_general(x, w, numbers)).lower(x, w).compile()
  assert cpu_dot_operand_types(plain.as_text()) == ['f32 x f32 -> f32']
  rounded = jax.lax.dot_general(x.astype(jnp.float32), w.astype(jnp.float32), numbers).astype(jnp.bfloat16)
  product = compiled(x, w)
  assert product.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(product, np.float32), np.asarray(rounded, np.float32), rtol=1e-2)

  for flags, expected in (('fpu avx2 avx512f avx512_bf16', True), ('fpu avx2 amx_bf16', True), ('fpu avx2', False)):
    (tmp_path / 'cpuinfo').write_text(f'processor\t: 0\nflags\t\t: {flags}\n')
    assert kernels.bfloat16_matmul_unit.__wrapped__(str(tmp_path / 'cpuinfo')) is expected
  from vit_jax.config import defaults
  from vit_jax.training import platform
  config = defaults.get_config()
  config.model.variant, config.input.image_size, config.model.dtype = 'tiny/4', 16, 'bfloat16'
  model = create_model('tiny/4', 5, dtype=jnp.bfloat16)
  backward = 'dense_backward' in platform.CPU_RULES
  for unit in (False, True):
    monkeypatch.setattr(kernels, 'bfloat16_matmul_unit', lambda unit=unit: unit)
    chosen, _ = platform.platform_model(model, config, 'cpu')
    bfloat16 = unit and 'bfloat16_dot' in platform.CPU_RULES
    expected = kernels.projection_dot_general(backward, bfloat16) if backward or bfloat16 else None
    assert chosen.dot_general is expected
    assert platform.platform_model(model, config, 'tpu')[0].dot_general is None
