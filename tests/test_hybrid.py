"""Hybrid ResNet+ViT models: published counts, the release's names and .npz layout, the ResNet
against numpy, fine-tuning at a new resolution, and training through the launcher."""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_models import normal
from vit_jax import checkpoint
from vit_jax.models import create_model
from vit_jax.models.resnet import resnet_conv_flops, resnet_features

# Parameter counts with 1000 classes at 224 px, from google-research/vision_transformer's
# models_test.py (its names: R+ViT-Ti_16, R26+ViT-S_32, ...).
PUBLISHED_PARAMS = {
    'R+Ti/16': 6_337_704,
    'R26+S/32': 36_431_912,
    'R26+B/32': 101_383_976,
    'R50+B/16': 98_659_112,
    'R50+L/32': 328_994_856,
}
TINY = 'Rtiny+tiny/8'  # Root width 32, stages (1, 1): stride 8, 1x1 patches.


def abstract_params(model, height, width):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, height, width, 3))))['params']


@pytest.mark.parametrize('variant', sorted(PUBLISHED_PARAMS))
def test_published_parameter_counts(variant):
  params = abstract_params(create_model(variant, 1000), 224, 224)
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(params)) == PUBLISHED_PARAMS[variant]


def test_summary_prints_the_published_count_with_the_resnet_first():
  from vit_jax.tools import summary
  lines = summary.summarize('R50+B/16').splitlines()
  assert lines[-1] == 'total_params: 98659112'
  assert 'stages (3, 4, 9) (stride 16)' in lines[0] and '14x14 patches, 197 tokens' in lines[0]
  names = [line.split()[0] for line in lines[2:-2]]
  assert names[:6] == ['conv_root', 'gn_root', 'block1', 'block2', 'block3', 'embedding']
  gflops = float(lines[-2].split('GFLOPs per image: ')[1].split()[0])
  assert 40 < gflops < 46  # B/16's 35.3 plus about 8 for the ResNet's convolutions.
  # The benchmark's analytic count (convolutions and matmuls only) is a little below XLA's.
  from vit_jax.bench import workload
  analytic = workload.matmul_flops_per_image(create_model('R50+B/16', 1000), 224, 'inference') / 1e9
  assert 0.97 * gflops < analytic <= gflops


@pytest.mark.parametrize('variant,grid', [('R+Ti/16', 7), ('R26+S/32', 7), ('R50+B/16', 14), ('R50+L/32', 7)])
def test_token_grid_is_the_resnet_grid(variant, grid):
  model = create_model(variant, 1000)
  assert model.token_grid(224, 224) == (grid, grid)
  posemb = abstract_params(model, 224, 224)['Transformer']['posembed_input']['pos_embedding']
  assert posemb.shape[1] == grid * grid + 1


def test_parameter_names_follow_the_release():
  params = abstract_params(create_model('R50+B/16', 1000), 224, 224)
  assert {'conv_root', 'gn_root', 'block1', 'block2', 'block3', 'embedding'} <= set(params)
  assert 'block4' not in params
  assert params['conv_root']['kernel'].shape == (7, 7, 3, 64) and 'bias' not in params['conv_root']
  assert params['gn_root']['scale'].shape == (64,)
  assert [len(params[f'block{i}']) for i in (1, 2, 3)] == [3, 4, 9]
  unit = params['block2']['unit1']
  assert set(unit) == {'conv1', 'gn1', 'conv2', 'gn2', 'conv3', 'gn3', 'conv_proj', 'gn_proj'}
  assert unit['conv2']['kernel'].shape == (3, 3, 128, 128)
  assert unit['conv_proj']['kernel'].shape == (1, 1, 256, 512)
  assert 'conv_proj' not in params['block2']['unit2']
  assert params['embedding']['kernel'].shape == (1, 1, 1024, 768)  # 1x1 patches of the /16 map.
  assert abstract_params(create_model('R+Ti/16', 1000), 224, 224)['embedding']['kernel'].shape == (8, 8, 64, 192)


@pytest.fixture(scope='module')
def hybrid():
  """The tiny hybrid at 32 px (a 4x4 grid): (model, fresh params, random params, jitted apply).

  Compiling is the slow part of these tests; they share one init and one apply.
  """
  model = create_model(TINY, 10)
  fresh = jax.device_get(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params'])
  leaves, tree = jax.tree.flatten(fresh)
  rng = np.random.default_rng(3)
  randomized = jax.tree.unflatten(tree, [rng.normal(size=x.shape).astype(x.dtype) for x in leaves])
  apply = jax.jit(lambda params, images: model.apply({'params': params}, images)[0])
  return model, fresh, randomized, apply


def test_fresh_units_are_identity_on_their_shortcut(hybrid):
  """gn3 starts at zero scale, as in the release."""
  _, params, _, _ = hybrid
  assert not np.any(params['block1']['unit1']['gn3']['scale'])
  assert np.all(params['gn_root']['scale'] == 1)


# An independent float64 computation of the ResNet part, from the paper's / BiT's formulas.
def np_conv(x, kernel, stride):
  """'SAME' convolution as XLA pads it (the extra pixel at the end), kernel (kh, kw, in, out)."""
  kh, kw = kernel.shape[:2]
  h, w = x.shape[1:3]
  oh, ow = -(-h // stride), -(-w // stride)
  ph, pw = max((oh - 1) * stride + kh - h, 0), max((ow - 1) * stride + kw - w, 0)
  x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
  out = np.zeros(x.shape[:1] + (oh, ow, kernel.shape[3]))
  for i in range(kh):
    for j in range(kw):
      out += np.einsum('bhwc,co->bhwo', x[:, i:i + stride * oh:stride, j:j + stride * ow:stride], kernel[i, j])
  return out


def np_standardize(kernel):
  flat = kernel.reshape(-1, kernel.shape[-1])
  return (kernel - flat.mean(0)) / (flat.std(0) + 1e-5)


def np_group_norm(x, scale, bias, groups=32, eps=1e-6):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def np_max_pool(x):  # 3x3, stride 2, 'SAME' (padding never wins the max).
  h, w = x.shape[1:3]
  oh, ow = -(-h // 2), -(-w // 2)
  ph, pw = max((oh - 1) * 2 + 3 - h, 0), max((ow - 1) * 2 + 3 - w, 0)
  x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), constant_values=-np.inf)
  return np.max([x[:, i:i + 2 * oh:2, j:j + 2 * ow:2] for i in range(3) for j in range(3)], axis=0)


def np_unit(x, p, stride):
  relu = lambda v: np.maximum(v, 0)  # noqa: E731
  conv = lambda v, name, s=1: np_conv(v, np_standardize(p[name]['kernel']), s)  # noqa: E731
  gn = lambda v, name: np_group_norm(v, p[name]['scale'], p[name]['bias'])  # noqa: E731
  residual = gn(conv(x, 'conv_proj', stride), 'gn_proj') if 'conv_proj' in p else x
  y = relu(gn(conv(x, 'conv1'), 'gn1'))
  y = relu(gn(conv(y, 'conv2', stride), 'gn2'))
  return relu(residual + gn(conv(y, 'conv3'), 'gn3'))


class Features(nn.Module):
  @nn.compact
  def __call__(self, x):
    return resnet_features(x, (1, 2), 32)


def test_resnet_matches_numpy():
  """Root (7x7/2 StdConv, GroupNorm, 3x3/2 max-pool) and three units (a projecting one, an
  identity one, a strided one) on random parameters, against the formulas in float64."""
  images = np.asarray(normal(1, (2, 22, 18, 3)))  # Odd sizes: 'SAME' pads.
  shapes = jax.eval_shape(Features().init, jax.random.key(0), images)['params']
  leaves, tree = jax.tree.flatten(shapes)
  rng = np.random.default_rng(2)
  params = jax.tree.unflatten(tree, [rng.normal(size=x.shape).astype(np.float32) for x in leaves])
  got = np.asarray(jax.jit(Features().apply)({'params': params}, images))

  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  x = np_conv(images.astype(np.float64), np_standardize(p['conv_root']['kernel']), 2)
  x = np_max_pool(np.maximum(np_group_norm(x, p['gn_root']['scale'], p['gn_root']['bias']), 0))
  x = np_unit(x, p['block1']['unit1'], 1)
  x = np_unit(x, p['block2']['unit1'], 2)
  x = np_unit(x, p['block2']['unit2'], 1)
  assert got.shape == x.shape == (2, 3, 3, 256)
  np.testing.assert_allclose(got, x, rtol=2e-4, atol=2e-4)


def test_resnet_flops_formula_matches_xla():
  images = jax.ShapeDtypeStruct((1, 64, 48, 3), jnp.float32)
  params = jax.eval_shape(Features().init, jax.random.key(0), images)
  cost = jax.jit(Features().apply).lower(params, images).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  total, root = resnet_conv_flops(64, 48, (1, 2), 32)
  assert root == 2 * 32 * 24 * 49 * 3 * 32
  # XLA also counts GroupNorm, ReLU, the pool and the weight standardisation: a few percent.
  assert total <= cost['flops'] <= 1.1 * total


def test_npz_round_trip_is_bit_exact_in_the_release_layout(tmp_path, hybrid):
  model, _, params, apply = hybrid
  first = str(tmp_path / 'hybrid.npz')
  checkpoint.save_npz(params, first)
  with np.load(first) as data:
    stored = {k: data[k] for k in data.files}
  # The release's names (top level, no 'ResNet/' prefix) and its (1, 1, 1, C) GroupNorm shape.
  assert stored['conv_root/kernel'].shape == (7, 7, 3, 32)
  assert stored['gn_root/scale'].shape == (1, 1, 1, 32)
  assert stored['block2/unit1/gn_proj/bias'].shape == (1, 1, 1, 256)
  assert stored['block1/unit1/conv1/kernel'].shape == (1, 1, 32, 32)
  assert not any(k.startswith('ResNet') for k in stored)

  loaded = checkpoint.load_npz(first)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
  second = str(tmp_path / 'again.npz')
  checkpoint.save_npz(loaded, second)
  with np.load(second) as data:
    assert set(data.files) == set(stored)
    assert all(data[k].shape == stored[k].shape and data[k].tobytes() == stored[k].tobytes() for k in stored)
  # The loaded parameters run and give the same logits.
  images = np.random.default_rng(4).normal(size=(2, 32, 32, 3)).astype(np.float32)
  fitted = checkpoint.load_for_model(first, model, 32)
  np.testing.assert_array_equal(apply(fitted, images), apply(params, images))


def test_finetune_at_a_new_resolution_resizes_posemb_on_the_resnet_grid(tmp_path, hybrid):
  """Saved at 32 px (a 4x4 ResNet grid), loaded at 48x64 px (6x8)."""
  model, _, params, apply = hybrid
  path = str(tmp_path / 'hybrid.npz')
  checkpoint.save_npz(params, path)
  fitted = checkpoint.load_for_model(path, model, (48, 64))
  posemb = params['Transformer']['posembed_input']['pos_embedding']
  resized = fitted['Transformer']['posembed_input']['pos_embedding']
  assert resized.shape == (1, 1 + 6 * 8, 32)
  np.testing.assert_array_equal(resized, checkpoint.resize_posemb(posemb, (6, 8), 1))
  np.testing.assert_array_equal(fitted['block2']['unit1']['conv2']['kernel'],
                                params['block2']['unit1']['conv2']['kernel'])
  assert apply(fitted, np.zeros((1, 48, 64, 3), np.float32)).shape == (1, 10)


def test_bad_image_size_names_the_resnet_stride():
  with pytest.raises(ValueError, match=r'not divisible by 16 \(the ResNet stride 16 x the patch size 1\)'):
    create_model('R50+B/16', 10).token_grid(224, 200)


@pytest.fixture
def hybrid_config(tiny_config):
  config = tiny_config
  config.model.variant = TINY
  config.input.image_size = 32  # A 4x4 grid of ResNet cells.
  config.mesh.fsdp_min_size = 16  # Small enough that FSDP really splits the ResNet's kernels.
  config.total_steps = 4
  config.eval_every_steps = config.checkpoint_every_steps = 4  # Compiling is the slow part: once.
  return config


def test_hybrid_trains_through_the_launcher(hybrid_config, tmp_path):
  """FSDP and data parallel over 8 devices, with scan, remat and bfloat16 on the transformer; then
  attention maps of the trained run on the ResNet grid. (One run: compiling is the slow part.)"""
  import jax.numpy as jnp

  from vit_jax.training import loop
  config = hybrid_config
  config.mesh.data = 2
  config.mesh.fsdp = 4
  config.model.scan = True
  config.model.remat = True
  config.model.dtype = 'bfloat16'
  workdir = str(tmp_path / 'run')
  loop.train_and_evaluate(config, workdir)  # What `vit-jax train` calls.
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  losses = [r['train/loss'] for r in rows if 'train/loss' in r]
  assert losses and all(np.isfinite(losses))
  assert any('eval/accuracy' in r for r in rows)

  from vit_jax.checkpoint.run import load_workdir
  from vit_jax.tools import attention_maps
  run = load_workdir(workdir)
  model = run.model.clone(dtype=jnp.float32)  # Maps in float32: rows of attention weights sum to 1.
  images = normal(0, (2, 32, 32, 3))
  _, out = jax.jit(lambda p, x: model.apply({'params': p}, x, return_attention=True))(run.params, images)
  maps = attention_maps.attention_maps(out, model, (32, 32))
  assert maps['rollout'].shape == (2, 32, 32) and maps['heads'].shape == (2, 2, 32, 32)
  np.testing.assert_allclose(maps['rollout'].sum(axis=(1, 2)), 1.0, rtol=1e-5)
  # Each token's weight covers its 8x8 cell of pixels.
  assert np.all(maps['rollout'][:, :8, :8] == maps['rollout'][:, :1, :1])
