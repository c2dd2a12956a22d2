"""2-D RoPE (config.model.posemb='rope_axial', 'rope_mixed', alone or with an absolute embedding):
the rotation against a numpy one, relative positions, other resolutions without any resize."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.errors import UsageError
from vit_jax.models import create_model, model_from_config, rope


def numpy_rotation(x: np.ndarray, positions: np.ndarray, freqs: np.ndarray) -> np.ndarray:
  """x (tokens, heads, head_dim) rotated pair by pair with explicit 2x2 matrices: pair j of a token
  at (row, column) turns by column * freqs[0, h, j] + row * freqs[1, h, j]."""
  out = np.empty_like(x, dtype=np.float64)
  for t, (row, column) in enumerate(positions):
    for h in range(x.shape[1]):
      for j in range(x.shape[2] // 2):
        angle = column * freqs[0, h, j] + row * freqs[1, h, j]
        matrix = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        out[t, h, 2 * j:2 * j + 2] = matrix @ x[t, h, 2 * j:2 * j + 2]
  return out


@pytest.mark.parametrize('mode', rope.ROTARY)
def test_rotation_against_numpy_and_relative_positions(mode):
  heads, head_dim, tokens = 2, 8, 6
  rng = np.random.default_rng(0)
  q, k = rng.standard_normal((2, 1, tokens, heads, head_dim)).astype(np.float32)
  positions = np.array([[0, 0], [0, 1], [1, 0], [2, 3], [3, 1], [5, 4]], np.float32)
  module = rope.Rotary(mode)
  variables = module.init(jax.random.key(1), q, k, positions[None])
  rotated_q, rotated_k = module.apply(variables, q, k, positions[None])
  if mode == 'rope_mixed':
    freqs = np.asarray(variables['params']['freqs'])
    assert freqs.shape == (2, heads, head_dim // 2)
    # RoPE-ViT's initialisation: per head and pair, |(f_x, f_y)| = 10^(-4i/head_dim).
    expected = np.tile(rope.magnitudes(head_dim, rope.MIXED_THETA), 2)
    np.testing.assert_allclose(np.hypot(freqs[0], freqs[1]), np.broadcast_to(expected, (heads, head_dim // 2)),
                               rtol=1e-5)
  else:
    assert 'params' not in variables
    freqs = rope.axial_frequencies(heads, head_dim)
    assert freqs[0, 0, 0] == 1.0 and freqs[1, 0, 0] == 0.0  # First half: columns only.
  np.testing.assert_allclose(rotated_q[0], numpy_rotation(q[0], positions, freqs), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(rotated_k[0], numpy_rotation(k[0], positions, freqs), rtol=1e-5, atol=1e-5)
  # q . k depends only on the difference of the positions: shifting every token changes nothing.
  shifted_q, shifted_k = module.apply(variables, q, k, positions[None] + np.array([3.0, -2.0], np.float32))
  logits = lambda a, b: np.einsum('thd,shd->hts', a[0], b[0])  # noqa: E731
  np.testing.assert_allclose(logits(shifted_q, shifted_k), logits(rotated_q, rotated_k), rtol=1e-4, atol=1e-4)
  assert not np.allclose(logits(rotated_q, rotated_k), logits(q, k), atol=1e-2)  # It does rotate.


def test_split_posemb_and_config_checks(tiny_config):
  assert rope.split_posemb('learn+rope_axial') == ('learn', 'rope_axial')
  assert rope.split_posemb('rope_mixed') == ('none', 'rope_mixed')
  assert rope.split_posemb('sincos2d') == ('sincos2d', '')
  with pytest.raises(ValueError, match='Unknown posemb'):
    rope.split_posemb('rope')
  tiny_config.model.posemb = 'rope_2d'
  with pytest.raises(UsageError, match="posemb='rope_2d'; use one of .*rope_axial"):
    model_from_config(tiny_config)
  tiny_config.model.posemb, tiny_config.model.hidden_size = 'rope_axial', 36  # 2 heads of 18.
  with pytest.raises(UsageError, match='head size .* = 18. must be a multiple of 4'):
    model_from_config(tiny_config)


def test_rope_models_run_at_other_resolutions_without_resize():
  """A RoPE-only model has no position table: its parameters fit any image size, and prefix tokens
  (class token, registers) are not rotated. With a learned table beside it, the table is the only
  resolution-bound parameter."""
  model = create_model('tiny/4', 5, posemb='rope_mixed', num_registers=1)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']
  assert 'posembed_input' not in params['Transformer']
  assert params['Transformer']['encoderblock_0']['MultiHeadDotProductAttention_1']['rope']['freqs'].shape == (
      2, 2, 8)
  images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 24, 3)), jnp.float32)
  logits, out = model.apply({'params': params}, images)
  assert logits.shape == (2, 5) and out['encoded'].shape == (2, 2 + 8 * 6, 32)
  both = create_model('tiny/4', 5, posemb='learn+rope_axial')
  shapes = jax.eval_shape(both.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']
  assert shapes['Transformer']['posembed_input']['pos_embedding'].shape == (1, 17, 32)
