"""The published .npz format: both layouts load, export is bit-exact, bad files fail clearly.

Checkpoint files are written here by the tests, in the published key layouts,
with random values of the published shapes (no weights are downloaded).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.checkpoint import load_for_model, load_npz, resize_posemb, save_npz
from vit_jax.checkpoint.npz import flatten_params
from vit_jax.errors import UsageError
from vit_jax.models import create_model
from vit_jax.models.vit import stack_blocks

# Our (= original release) block children -> big_vision's.
TO_BIG_VISION = {'MultiHeadDotProductAttention_1': 'MultiHeadDotProductAttention_0',
                 'LayerNorm_2': 'LayerNorm_1', 'MlpBlock_3': 'MlpBlock_0'}


def random_checkpoint(model, image_size, seed=0):
  """{key: random float32 array} with the model's published keys and shapes (nothing is initialised).

  Uniform in [-0.05, 0.05): numpy draws B/16's 86M float32 values so about 6x faster than normal ones."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3))))
  rng = np.random.default_rng(seed)
  return {k: (rng.random(v.shape, np.float32) - 0.5) * np.float32(0.1)
          for k, v in flatten_params(shapes['params']).items()}


def to_big_vision(flat, prefix='params/'):
  """Original-layout keys -> big_vision's: renamed block children, top-level posemb without class entry."""
  out = {}
  for key, value in flat.items():
    parts = key.split('/')
    if parts[0] == 'Transformer' and parts[1].startswith('encoderblock_'):
      parts[2] = TO_BIG_VISION.get(parts[2], parts[2])
    if key == 'Transformer/posembed_input/pos_embedding':
      parts = ['pos_embedding']
      value = value[:, 1:] if 'cls' in flat else value
    out[prefix + '/'.join(parts)] = value
  return out


def jit_forward(model):
  return jax.jit(lambda params, images: model.apply({'params': params}, images)[0])


def assert_same_arrays(a, b):
  a, b = flatten_params(a), flatten_params(b)
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
    assert np.asarray(a[key]).dtype == np.asarray(b[key]).dtype


def test_b16_original_layout_loads_runs_exports_bit_exact(tmp_path):
  """A ViT-B/16 file in the original layout (with pre_logits, as the i21k release) round-trips."""
  model = create_model('B/16', 1000, representation_size=768)
  flat = random_checkpoint(model, 224)
  assert flat['Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel'].shape == (768, 12, 64)
  assert flat['Transformer/posembed_input/pos_embedding'].shape == (1, 197, 768)
  assert flat['pre_logits/kernel'].shape == (768, 768)
  original = tmp_path / 'ViT-B_16.npz'
  np.savez(original, **flat)

  params = load_npz(str(original))
  logits = jit_forward(model)(params, jnp.zeros((1, 224, 224, 3)) + 0.1)
  assert logits.shape == (1, 1000) and np.isfinite(logits).all()

  exported = tmp_path / 'exported.npz'
  save_npz(params, str(exported))
  with np.load(exported) as data:  # Same keys, same bits as the published file.
    assert sorted(data.files) == sorted(flat)
    for key in data.files:
      np.testing.assert_array_equal(data[key], flat[key], err_msg=key)
  assert_same_arrays(load_npz(str(exported)), params)
  assert_same_arrays(load_for_model(str(exported), model, 224), params)


def test_b16_big_vision_layout_with_map_head(tmp_path):
  """big_vision layout (params/ prefix, posemb apart, MAP head) loads, runs, exports, reloads bit-exactly."""
  model = create_model('B/16', 1000, pool='map')
  flat = random_checkpoint(model, 224, seed=1)
  big_vision = to_big_vision(flat)
  assert 'params/MAPHead_0/probe' in big_vision and 'params/pos_embedding' in big_vision
  assert 'params/Transformer/encoderblock_11/MlpBlock_0/Dense_1/kernel' in big_vision
  path = tmp_path / 'bv_B16_map.npz'
  np.savez(path, **big_vision)

  params = load_npz(str(path))
  assert_same_arrays(params, load_npz_flat(flat, tmp_path))  # Same arrays as the original layout.
  logits = jit_forward(model)(params, jnp.zeros((1, 224, 224, 3)) + 0.1)
  assert np.isfinite(logits).all()
  exported = tmp_path / 'exported.npz'
  save_npz(params, str(exported))
  assert_same_arrays(load_npz(str(exported)), params)


def load_npz_flat(flat, tmp_path):
  path = tmp_path / 'reference.npz'
  np.savez(path, **flat)
  return load_npz(str(path))


@pytest.mark.parametrize('pool', ['token', 'gap'])
def test_big_vision_posemb_is_the_same_function(tmp_path, pool):
  """big_vision adds posemb before prepending the class token; the loaded model computes the same."""
  model = create_model('tiny/4', 5, pool=pool)
  flat = random_checkpoint(model, 16, seed=2)
  if pool == 'token':
    flat['Transformer/posembed_input/pos_embedding'][:, 0] = 0.0  # big_vision's class token has none.
  path = tmp_path / 'bv.npz'
  np.savez(path, **to_big_vision(flat, prefix=''))
  params = load_npz(str(path))
  assert_same_arrays(params, load_npz_flat(flat, tmp_path))


def test_scanned_big_vision_checkpoint_loads_per_block(tmp_path):
  model = create_model('tiny/4', 5, pool='map')
  flat = random_checkpoint(model, 16, seed=3)
  reference = load_npz_flat(flat, tmp_path)
  stacked = flatten_params(stack_blocks(reference))
  assert stacked['Transformer/encoderblock/LayerNorm_0/scale'].shape == (2, 32)
  bv = {}
  for key, value in stacked.items():
    for ours, theirs in TO_BIG_VISION.items():
      key = key.replace(f'encoderblock/{ours}/', f'encoderblock/{theirs}/')
    bv[key] = value
  np.savez(tmp_path / 'scanned.npz', **bv)
  assert_same_arrays(load_npz(str(tmp_path / 'scanned.npz')), reference)


def test_scan_model_exports_per_block_layout(tmp_path):
  model = create_model('tiny/4', 5, scan=True, num_registers=2, qk_norm=True, layerscale=0.1)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']
  save_npz(params, str(tmp_path / 'scan.npz'))
  with np.load(tmp_path / 'scan.npz') as data:
    assert 'Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query_ln/scale' in data.files
    assert 'Transformer/encoderblock_0/layerscale_mlp/scale' in data.files and 'registers' in data.files
    assert not any(k.startswith('Transformer/encoderblock/') for k in data.files)
  # Loading into the scanned model stacks the blocks back, bit-exactly.
  assert_same_arrays(load_for_model(str(tmp_path / 'scan.npz'), model, 16), jax.device_get(params))


def test_mismatches_are_reported_together(tmp_path):
  model = create_model('tiny/4', 5)
  flat = random_checkpoint(model, 16)
  del flat['Transformer/encoder_norm/scale']
  flat['Transformer/extra/kernel'] = np.zeros(3, np.float32)
  flat['head/kernel'] = np.zeros((32, 7), np.float32)
  np.savez(tmp_path / 'bad.npz', **flat)
  with pytest.raises(UsageError) as error:
    load_for_model(str(tmp_path / 'bad.npz'), model, 16)
  message = str(error.value)
  assert '\n' not in message
  assert '1 missing: Transformer/encoder_norm/scale' in message
  assert '1 unexpected: Transformer/extra/kernel' in message
  assert 'head/kernel (32, 7) vs model (32, 5)' in message
  with pytest.raises(UsageError, match='does not exist'):
    load_npz(str(tmp_path / 'missing.npz'))


def test_resize_posemb_bilinear_with_class_entry_apart():
  rng = np.random.default_rng(0)
  posemb = rng.standard_normal((1, 1 + 7 * 7, 8)).astype(np.float32)
  resized = resize_posemb(posemb, (12, 12), num_prefix=1)
  assert resized.shape == (1, 1 + 144, 8)
  np.testing.assert_array_equal(resized[:, 0], posemb[:, 0])  # Class entry copied, not interpolated.
  grid = resized[0, 1:].reshape(12, 12, 8)
  np.testing.assert_allclose(grid[0, 0], posemb[0, 1])  # Corners are kept (aligned corners).
  np.testing.assert_allclose(grid[-1, -1], posemb[0, -1], rtol=1e-6)
  # Bilinear interpolation reproduces a function linear in (row, column) exactly.
  rows, cols = np.mgrid[:7, :7]
  linear = (2 * rows + 3 * cols).reshape(1, 49, 1).astype(np.float32)
  rows, cols = np.mgrid[:13, :13] * (6 / 12)
  np.testing.assert_allclose(resize_posemb(linear, (13, 13), 0)[0, :, 0], (2 * rows + 3 * cols).ravel(),
                             rtol=1e-5, atol=1e-5)
  scipy_ndimage = pytest.importorskip('scipy.ndimage')  # The original release's resize.
  expected = scipy_ndimage.zoom(posemb[0, 1:].reshape(7, 7, 8), (12 / 7, 12 / 7, 1), order=1)
  np.testing.assert_allclose(grid, expected, rtol=1e-5, atol=1e-6)
  # Class entry dropped for a model without class token; same grid is a copy.
  assert resize_posemb(posemb, (7, 7), 1, new_num_prefix=0).shape == (1, 49, 8)
  np.testing.assert_array_equal(resize_posemb(posemb, (7, 7), 1), posemb)
