"""FlexiViT: PI-resize against its definition, a run trained through the launcher with a patch size per
step (also token dropping and Muon, on 8 devices with FSDP) that resumes bitwise, and that run or its
checkpoint evaluated, exported and loaded at another patch size.

The launcher run is trained once per module (tiny/4 at 16 px, patch sizes 2, 4 and 8) and shared.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.test_train import read_metrics, train_flags
from vit_jax import checkpoint
from vit_jax.checkpoint import resize, run as run_lib
from vit_jax.config.files import load_config
from vit_jax.errors import UsageError
from vit_jax.models import create_model, flexi, model_from_config
from vit_jax.training import flexi as flexi_training, setup as setup_lib, sharding


def jax_resize_matrix(old: int, new: int) -> np.ndarray:
  """(new * new, old * old): jax.image.resize (bilinear) of each basis patch, as columns."""
  basis = np.eye(old * old, dtype=np.float32).reshape(old * old, old, old)
  resized = jax.image.resize(basis, (old * old, new, new), 'bilinear')  # Each basis patch on its own.
  return np.asarray(resized, np.float64).reshape(old * old, new * new).T


@pytest.mark.parametrize('old,new', [(4, 8), (4, 6), (3, 5), (4, 2), (6, 4)])
def test_pi_resize_is_the_least_squares_solution(old, new):
  """w = argmin ||B^T w - w0|| for B the bilinear resize of a patch (built from jax.image.resize, not
  from the code under test); exact, B^T w = w0, when the patch grows."""
  kernel = np.random.default_rng(0).standard_normal((old, old, 3, 5))
  b = jax_resize_matrix(old, new)
  expected = np.linalg.lstsq(b.T, kernel.reshape(old * old, 15), rcond=None)[0].reshape(new, new, 3, 5)
  # B from jax is float32: agreement to float32's precision.
  np.testing.assert_allclose(flexi.pi_resize_kernel(kernel, (new, new)), expected, rtol=1e-5, atol=1e-5)
  resized = flexi.pi_resize_kernel(jnp.asarray(kernel, jnp.float32), (new, new))  # In a train step.
  assert resized.dtype == jnp.float32
  np.testing.assert_allclose(resized, expected, rtol=1e-5, atol=1e-5)
  if new >= old:
    np.testing.assert_allclose(b.T @ expected.reshape(new * new, 15), kernel.reshape(old * old, 15), atol=1e-8)


def test_a_resized_model_on_resized_patches_gives_the_same_tokens_and_logits():
  """FlexiViT's property: each 4x4 patch of a 16 px image resized to 8x8 (a 32 px image) and the model
  at patch size 8 (kernel PI-resized; the same 4x4 grid, so the same position embeddings) give the
  same patch tokens, hence the same logits."""
  model = create_model('tiny/4', 5)
  images = jnp.asarray(np.random.default_rng(1).standard_normal((2, 16, 16, 3)), jnp.float32)
  params = model.init(jax.random.key(0), images)['params']
  params['head']['kernel'] = jnp.asarray(np.random.default_rng(2).standard_normal((32, 5)), jnp.float32)
  patches = images.reshape(2, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5)  # (batch, row, col, 4, 4, 3)
  grown = jax.image.resize(patches, (2, 4, 4, 8, 8, 3), 'bilinear')
  large = grown.transpose(0, 1, 3, 2, 4, 5).reshape(2, 32, 32, 3)
  resized = {**params, 'embedding': {**params['embedding'],
                                     'kernel': flexi.pi_resize_kernel(params['embedding']['kernel'], (8, 8))}}
  assert resized['embedding']['kernel'].shape == (8, 8, 3, 32)
  logits, out = model.apply({'params': params}, images)
  logits_8, out_8 = model.clone(patch_size=8).apply({'params': resized}, large)
  np.testing.assert_allclose(out_8['encoded'], out['encoded'], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(logits_8, logits, rtol=1e-4, atol=1e-5)
  assert np.abs(np.asarray(logits)).max() > 0.1  # Not trivially equal.


@pytest.mark.parametrize('new_grid', [(8, 8), (2, 2), (3, 5)])
def test_posemb_resize_is_the_checkpoint_loaders(new_grid):
  """The position-embedding resize of a FlexiViT step (float32, jnp) is the one applied when a checkpoint
  is loaded at another resolution (vit_jax.checkpoint.npz.resize_posemb, float64 numpy)."""
  posemb = np.random.default_rng(3).standard_normal((1, 17, 8)).astype(np.float32)
  expected = checkpoint.resize_posemb(posemb, new_grid, 1)
  in_step = flexi.resize_posemb(jnp.asarray(posemb), (4, 4), new_grid, 1)
  np.testing.assert_allclose(in_step, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(flexi.resize_posemb(posemb, (4, 4), new_grid, 1), expected, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize('variant,patch_sizes,message', [
    ('tiny/4', (2, 3), 'patch_sizes=(2, 3): 3 do not divide the 16x16 images'),
    ('Rtiny+tiny/8', (1, 2), 'needs a plain ViT, not a hybrid'),
])
def test_bad_patch_sizes_fail_in_one_line(tiny_config, variant, patch_sizes, message):
  tiny_config.model.variant, tiny_config.model.patch_sizes = variant, patch_sizes
  with pytest.raises(UsageError, match=message.replace('(', r'\(').replace(')', r'\)')):
    model_from_config(tiny_config)


# --- One run through the launcher: patch sizes 2, 4, 8; token dropping; Muon; 8 devices, FSDP. ---

DESIGN_FLAGS = ('--config.model.variant=tiny/4', '--config.input.image_size=16',
                '--config.model.patch_sizes=(2,4,8)', '--config.model.patch_dropout=0.5',
                '--config.optimizer.name=muon', '--config.mesh.fsdp=2', '--config.mesh.fsdp_min_size=256',
                '--config.log_every_steps=1', '--config.keep_checkpoints=5',
                '--config.optimizer.schedule=constant', '--config.optimizer.warmup_steps=1')
_CACHE: dict = {}


@pytest.fixture
def trained(tmp_path_factory, data_dir, run_command):
  """The workdir of the run trained straight to step 4 (checkpoints at 2 and 4)."""
  if 'workdir' not in _CACHE:
    workdir = str(tmp_path_factory.mktemp('flexi') / 'straight')
    result = run_command('train', *train_flags(workdir, data_dir, *DESIGN_FLAGS, '--config.total_steps=4'))
    assert result.returncode == 0, result.stderr[-3000:]
    _CACHE['workdir'], _CACHE['stdout'] = workdir, result.stdout
  return _CACHE['workdir']


def restored_state(workdir):
  config = load_config(os.path.join(workdir, 'config.json'))
  run = setup_lib.setup(config, sharding.make_mesh(config))
  manager = checkpoint.create_manager(workdir, config)
  state = checkpoint.restore_latest(manager, sharding.placed(run.abstract_state, run.state_sharding), config)
  manager.close()
  return state


def test_flexi_dropout_muon_run_trains_on_8_devices_and_resumes_bitwise(trained, tmp_path, data_dir, run_command):
  assert '8 devices (mesh data=4, fsdp=2)' in _CACHE['stdout']
  rows = [r for r in read_metrics(trained) if 'train/loss' in r]
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  # Each step's patch size is the draw of its key, a function of the seed and the step alone.
  config = load_config(os.path.join(trained, 'config.json'))
  _, dropout_rng = setup_lib.seed_rngs(config)
  drawn = [(2, 4, 8)[int(flexi_training.patch_size_index(jax.random.fold_in(dropout_rng, s), 3))]
           for s in range(4)]
  assert [r['train/patch_size'] for r in rows] == drawn
  assert len(set(drawn)) > 1, drawn  # Seed 0 mixes patch sizes in four steps.

  # The same run stopped after its checkpoint at step 2 (a copy without the later one), resumed.
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(trained, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '4'))
  result = run_command('train', *train_flags(resumed, data_dir, *DESIGN_FLAGS, '--config.total_steps=4'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resuming from the checkpoint at step 2' in result.stdout
  again = [r for r in read_metrics(resumed) if 'train/loss' in r]
  for key in ('train/loss', 'train/patch_size', 'train/grad_norm'):
    assert [r[key] for r in again] == [r[key] for r in rows], key
  a, b = restored_state(trained), restored_state(resumed)
  assert int(a.step) == int(b.step) == 4
  leaves = jax.tree.leaves(a.opt_state, is_leaf=lambda x: isinstance(x, optax.contrib.MuonState))
  assert any(isinstance(x, optax.contrib.MuonState) for x in leaves)
  assert a.params['embedding']['kernel'].shape == (4, 4, 3, 32)  # Stored at the variant's patch size.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_a_run_evaluates_exports_and_loads_at_another_patch_size(trained, tmp_path, run_command):
  result = run_command('evaluate', '--workdir', trained, '--patch_size', '8', '--out_dir', str(tmp_path / 'p8'))
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / 'p8' / 'report.json').read_text())
  assert report['patch_size'] == 8 and report['num_examples'] == 360

  # The converted run is the model a FlexiViT step trains at patch size 8 (float32 resize in the graph).
  run = run_lib.load_workdir(trained)
  at_8 = resize.at_patch_size(run, 8)
  assert at_8.config.model.variant == 'tiny/8' and at_8.model.patch_size == 8
  images = jnp.asarray(np.random.default_rng(4).standard_normal((2, 16, 16, 3)), jnp.float32)
  in_step = jax.jit(lambda p: at_8.model.apply({'params': flexi.resize_params(p, 8, (16, 16))}, images)[0])
  converted = jax.jit(lambda p: at_8.model.apply({'params': p}, images)[0])(at_8.params)
  np.testing.assert_allclose(converted, in_step(run.params),
                             rtol=1e-5, atol=1e-5)

  # Exported at 8; and the export at 4 loaded into a patch-8 model goes through the same resize.
  result = run_command('export', '--workdir', trained, '--out', str(tmp_path / 'p8.npz'), '--patch_size', '8')
  assert result.returncode == 0, result.stderr[-3000:]
  exported = run_lib.load_exported(str(tmp_path / 'p8.npz'))
  assert exported.config.model.variant == 'tiny/8'
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(exported.params), jax.device_get(at_8.params))
  checkpoint.save_npz(run.params, str(tmp_path / 'p4.npz'))
  loaded = checkpoint.load_for_model(str(tmp_path / 'p4.npz'), at_8.model, 16)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), loaded,
               jax.device_get(at_8.params))

  with pytest.raises(UsageError, match='--patch_size=3 does not divide'):
    resize.at_patch_size(run, 3)
  assert resize.at_patch_size(run, 4) is run
