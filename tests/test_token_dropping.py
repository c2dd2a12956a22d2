"""Token dropping (config.model.patch_dropout): the share kept, what is never dropped, none at evaluation.

Training through the launcher and a bitwise resume with patch_dropout=0.5: tests/test_flexivit.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.config import defaults
from vit_jax.errors import UsageError
from vit_jax.models import create_model, model_from_config
from vit_jax.models.token_dropping import drop_patches, kept_patches


@pytest.mark.parametrize('rate,kept', [(0.25, 12), (0.5, 8), (0.75, 4), (0.99, 1)])
def test_each_image_keeps_the_stated_share_of_its_own_patches_in_order(rate, kept):
  """Tokens numbered 100 * image + position: the class token stays first, each image keeps `kept` of
  its own 16 patches, none twice, in their order, and the images draw different subsets."""
  batch, patches = 6, 16
  ids = 100 * np.arange(batch)[:, None] + np.arange(1 + patches)[None, :]
  x = jnp.asarray(np.repeat(ids[:, :, None], 3, axis=2), jnp.float32)  # (batch, 1 + 16, 3)
  out = np.asarray(drop_patches(jax.random.key(0), x, 1, rate))
  assert kept_patches(patches, rate) == kept and out.shape == (batch, 1 + kept, 3)
  np.testing.assert_array_equal(out[:, 0], np.asarray(x[:, 0]))  # The class token.
  positions = out[:, 1:, 0] - 100 * np.arange(batch)[:, None]
  assert ((positions >= 1) & (positions <= patches)).all()  # Each image's own patch tokens only.
  assert (np.diff(positions, axis=1) > 0).all()  # No repeats, row-major order kept.
  if kept < patches - 1:
    assert len({tuple(p) for p in positions}) > 1


def test_the_model_drops_patches_in_training_only_never_class_token_or_registers():
  model = create_model('tiny/4', 5, num_registers=2, patch_dropout=0.5)
  gap = create_model('tiny/4', 5, pool='gap', patch_dropout=0.25)
  images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 3)), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(0), images)['params']
  rngs = {'dropout': jax.random.key(1)}

  @jax.jit
  def outputs(params):
    train = model.apply({'params': params}, images, train=True, rngs=rngs)[1]['encoded']
    logits, out = model.apply({'params': params}, images)
    plain = model.clone(patch_dropout=0.0).apply({'params': params}, images)[0]
    gap_params = gap.init(jax.random.key(0), images)['params']
    return train, logits, out['encoded'], plain, gap.apply({'params': gap_params}, images, train=True,
                                                           rngs=rngs)[1]['encoded']
  train, logits, encoded, plain, gap_train = outputs(params)
  assert train.shape == (2, 1 + 2 + 8, 32)  # Class token, 2 registers, 8 of 16 patches.
  assert encoded.shape == (2, 1 + 2 + 16, 32)
  np.testing.assert_array_equal(logits, plain)  # Evaluation keeps every token: the plain model.
  assert gap_train.shape == (2, 12, 32)  # No class token: 12 of 16 patches.


def test_dropping_is_differentiable_in_both_modes():
  """Plain JAX: jax.jvp along the parameters equals the gradient's dot product with the direction."""
  model = create_model('tiny/4', 5, patch_dropout=0.5)
  images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 3)), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(0), images)['params']
  loss = lambda p: model.apply({'params': p}, images, train=True,  # noqa: E731
                               rngs={'dropout': jax.random.key(1)})[1]['pre_logits'].sum()
  direction = jax.tree.map(jnp.ones_like, params)
  tangent, grads = jax.jit(lambda p, d: (jax.jvp(loss, (p,), (d,))[1], jax.grad(loss)(p)))(params, direction)
  reverse = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
  np.testing.assert_allclose(float(tangent), reverse, rtol=1e-4)


def test_a_rate_outside_0_1_fails_in_one_line():
  config = defaults.get_config()
  config.model.patch_dropout = 1.0
  with pytest.raises(UsageError, match=r'patch_dropout=1.0 must be in \[0, 1\)'):
    model_from_config(config)
