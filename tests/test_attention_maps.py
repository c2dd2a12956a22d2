"""Attention rollout and per-head maps: against hand computation, for every pooling and prefix layout."""

import functools
import types

import jax
import numpy as np
import pytest

from vit_jax.tools import attention_maps
from vit_jax.models import create_model


def init_and_apply(model, images):
  """(logits, intermediates) with attention of a freshly initialised model; jitted, which is faster here."""
  params = jax.jit(model.init)(jax.random.key(0), images)['params']
  return jax.jit(functools.partial(model.apply, return_attention=True))({'params': params}, images)


def random_attention(rng, layers, batch, heads, tokens):
  """Row-stochastic attention weights, per layer (batch, heads, tokens, tokens)."""
  weights = [rng.random((batch, heads, tokens, tokens)) ** 4 for _ in range(layers)]
  return [w / w.sum(-1, keepdims=True) for w in weights]


def test_rollout_of_two_layers_matches_the_hand_computation():
  third = np.full((3, 3), 1 / 3)
  # Layer 1: head 1 attends to itself, head 2 uniformly. Mean 0.5 I + 1/6; plus I,
  # rows sum to 2: (0.75 I + 1/12), i.e. 5/6 on the diagonal, 1/12 elsewhere.
  layer1 = np.stack([np.eye(3), third])[None]
  # Layer 2: both heads attend to token 0. Plus I and re-normalised: row 0 is
  # [1, 0, 0], row i > 0 is half on token 0 and half on itself.
  to_first = np.zeros((3, 3))
  to_first[:, 0] = 1
  layer2 = np.stack([to_first, to_first])[None]
  expected = np.array([[5 / 6, 1 / 12, 1 / 12],
                       [11 / 24, 11 / 24, 1 / 12],
                       [11 / 24, 1 / 12, 11 / 24]])
  np.testing.assert_allclose(attention_maps.rollout([layer1, layer2])[0], expected, rtol=1e-6)
  # The order matters: the last layer multiplies from the left.
  assert not np.allclose(attention_maps.rollout([layer2, layer1])[0], expected)


def explicit_rollout(attention):
  """Rollout with loops: R = A_2' A_1' with A' = normalise(mean_heads(A) + I), one example."""
  tokens = attention[0].shape[-1]
  result = np.eye(tokens)
  for weights in attention:
    mean = np.zeros((tokens, tokens))
    for head in weights:
      mean += head / len(weights)
    mean += np.eye(tokens)
    for row in range(tokens):
      mean[row] /= mean[row].sum()
    result = mean @ result
  return result


def test_maps_of_the_two_layer_tiny_model_match_an_explicit_computation():
  model = create_model('tiny/4', 10)  # 2 layers, 2 heads, class token.
  images = jax.random.uniform(jax.random.key(1), (2, 8, 12, 3), minval=-1, maxval=1)
  _, intermediates = init_and_apply(model, images)
  attention = [np.asarray(a, np.float64) for a in intermediates['attention']]
  assert len(attention) == 2 and attention[0].shape == (2, 2, 7, 7)  # 1 + 2x3 patches.

  rolled = attention_maps.rollout(attention)
  np.testing.assert_allclose(rolled.sum(-1), 1.0, atol=1e-5)  # Each query row is a distribution.
  maps = attention_maps.attention_maps(intermediates, model, (8, 12))
  assert maps['rollout'].shape == (2, 8, 12) and maps['heads'].shape == (2, 2, 8, 12)
  for b in range(2):
    full = explicit_rollout([a[b] for a in attention])
    np.testing.assert_allclose(rolled[b], full, atol=1e-6)
    patches = full[0, 1:] / full[0, 1:].sum()  # Class-token row, patch columns.
    expected = np.kron(patches.reshape(2, 3), np.ones((4, 4))) / 16
    np.testing.assert_allclose(maps['rollout'][b], expected, atol=1e-6)
    np.testing.assert_allclose(maps['rollout'][b].sum(), 1.0, atol=1e-6)
    for h in range(2):
      last = attention[-1][b, h, 0, 1:] / attention[-1][b, h, 0, 1:].sum()
      np.testing.assert_allclose(maps['heads'][b, h], np.kron(last.reshape(2, 3), np.ones((4, 4))) / 16,
                                 atol=1e-6)


@pytest.mark.parametrize('pool,registers,prefix', [('token', 0, 1), ('gap', 0, 0), ('token', 2, 3),
                                                   ('gap', 4, 4), ('map', 1, 1)])
def test_prefix_tokens_and_query_rows_follow_the_pooling(pool, registers, prefix):
  model = types.SimpleNamespace(pool=pool, patch_size=2, num_registers=registers)
  assert attention_maps.num_prefix_tokens(model) == prefix
  rng = np.random.default_rng(0)
  tokens = prefix + 4  # A 2x2 patch grid of a 4x4 input.
  attention = random_attention(rng, 3, 2, 2, tokens)
  intermediates = {'attention': attention}
  rolled = attention_maps.rollout(attention)
  if pool == 'token':
    rows = rolled[:, 0]  # The class token is what the head reads.
    last_rows = attention[-1][:, :, 0]
  elif pool == 'gap':
    rows = rolled[:, prefix:].mean(1)  # The mean over patch-token queries; registers excluded.
    last_rows = attention[-1][:, :, prefix:].mean(2)
  else:
    probe = rng.random((2, 2, 1, tokens))
    probe /= probe.sum(-1, keepdims=True)
    intermediates['map_attention'] = probe
    rows = np.einsum('bt,bts->bs', probe[:, :, 0].mean(1), rolled)
    last_rows = probe[:, :, 0]
  maps = attention_maps.attention_maps(intermediates, model, (4, 4))
  patches = rows[:, prefix:] / rows[:, prefix:].sum(-1, keepdims=True)
  np.testing.assert_allclose(maps['rollout'], np.kron(patches.reshape(2, 2, 2), np.ones((1, 2, 2))) / 4,
                             rtol=1e-5)
  last = last_rows[..., prefix:] / last_rows[..., prefix:].sum(-1, keepdims=True)
  np.testing.assert_allclose(maps['heads'], np.kron(last.reshape(2, 2, 2, 2), np.ones((1, 1, 2, 2))) / 4,
                             rtol=1e-5)
  np.testing.assert_allclose(maps['heads'].sum((2, 3)), 1.0, atol=1e-6)


def test_a_gap_model_reads_the_mean_of_its_patch_queries():
  model = create_model('tiny/4', 10, pool='gap')
  images = jax.random.uniform(jax.random.key(2), (1, 8, 8, 3), minval=-1, maxval=1)
  _, intermediates = init_and_apply(model, images)
  attention = [np.asarray(a) for a in intermediates['attention']]
  assert attention[0].shape[-1] == 4  # No class token: the 2x2 patches only.
  maps = attention_maps.attention_maps(intermediates, model, (8, 8))
  rows = attention_maps.rollout(attention)[0].mean(0)
  np.testing.assert_allclose(maps['rollout'][0], np.kron(rows.reshape(2, 2), np.ones((4, 4))) / 16, atol=1e-6)


def test_a_wrong_image_shape_is_refused():
  model = types.SimpleNamespace(pool='token', patch_size=4)
  attention = random_attention(np.random.default_rng(0), 1, 1, 1, 5)
  with pytest.raises(ValueError, match='does not match 1 prefix tokens plus a 4x4 patch grid'):
    attention_maps.attention_maps({'attention': attention}, model, (16, 16))


def test_save_maps_writes_a_png_and_the_arrays(tmp_path):
  rng = np.random.default_rng(0)
  maps = {'rollout': rng.random((8, 8)), 'heads': rng.random((3, 8, 8))}
  image = attention_maps.display_image(rng.uniform(-1, 1, (8, 8, 3)))
  assert image.min() == 0 and image.max() == 1
  paths = attention_maps.save_maps(str(tmp_path / 'out'), 'seven', image, maps, title='7 (93%)')
  assert paths['png'].endswith('seven_attention.png') and open(paths['png'], 'rb').read(4) == b'\x89PNG'
  np.testing.assert_allclose(np.load(paths['rollout']), maps['rollout'], rtol=1e-6)
  assert np.load(paths['heads']).shape == (3, 8, 8)
