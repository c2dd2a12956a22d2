"""Fine-tuning from a published-layout checkpoint: through the launcher, at a new resolution and head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_train import train_in_process
from vit_jax.training import loop
from vit_jax.checkpoint import load_for_model, resize_posemb, save_npz
from vit_jax.checkpoint.npz import flatten_params, load_pretrained
from vit_jax.errors import UsageError
from vit_jax.models import create_model


def test_finetune_through_launcher_resizes_posemb_and_resets_head(tmp_path, data_dir, run_command):
  # "Pretrained": the base config's tiny/2 at 8 px (4x4 patches) with a 5-class head, exported.
  pretrained = create_model('tiny/2', 5)
  params = jax.device_get(jax.jit(pretrained.init)(jax.random.key(7), jnp.zeros((1, 8, 8, 3)))['params'])
  params['head']['kernel'] = np.random.default_rng(0).standard_normal((32, 5)).astype(np.float32)
  path = tmp_path / 'pretrained.npz'
  save_npz(params, str(path))

  # Fine-tune on the 10 digits at 16 px (8x8 patches). A zero learning rate keeps the
  # parameters where the init put them, so the checkpoint shows exactly what was loaded.
  workdir = tmp_path / 'finetune'
  result = train_in_process(run_command, workdir, data_dir, '--config.total_steps=2',
                            '--config.input.image_size=16', f'--config.init.path={path}',
                            '--config.optimizer.name=sgd', '--config.optimizer.learning_rate=0.0',
                            '--config.optimizer.weight_decay=0.0')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Initialised from {path}' in result.stdout and 'step 2/2' in result.stdout

  tuned = flatten_params(load_pretrained(str(workdir)))  # Our own orbax workdir, read back.
  original = flatten_params(params)
  posemb = 'Transformer/posembed_input/pos_embedding'
  assert tuned[posemb].shape == (1, 1 + 64, 32)
  np.testing.assert_array_equal(tuned[posemb], resize_posemb(original[posemb], (8, 8), num_prefix=1))
  np.testing.assert_array_equal(tuned['head/kernel'], np.zeros((32, 10), np.float32))
  np.testing.assert_array_equal(tuned['head/bias'], np.zeros(10, np.float32))
  for key in original:
    if key != posemb and not key.startswith('head/'):
      np.testing.assert_array_equal(tuned[key], original[key], err_msg=key)

  # The fine-tuned workdir is itself a starting point: here for a scanned 3-class model.
  scanned = create_model('tiny/2', 3, scan=True)
  again = load_for_model(str(workdir), scanned, 16, reset_head=True)
  assert again['Transformer']['encoderblock']['LayerNorm_0']['scale'].shape == (2, 32)
  assert again['head']['kernel'].shape == (32, 3)
  logits = jax.jit(lambda p, x: scanned.apply({'params': p}, x)[0])(again, jnp.ones((2, 16, 16, 3)))
  np.testing.assert_array_equal(logits, np.zeros((2, 3), np.float32))  # Zero head: uniform logits.


def test_finetune_errors_are_usage_errors(tiny_config, tmp_path):
  tiny_config.init.path = str(tmp_path / 'missing.npz')
  with pytest.raises(UsageError, match='missing.npz.*does not exist'):
    loop.train_and_evaluate(tiny_config, str(tmp_path / 'run'))

  # A checkpoint of another architecture names the keys that do not fit.
  other = create_model('tiny/4', 10, pool='gap')
  params = jax.jit(other.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']
  save_npz(params, str(tmp_path / 'gap.npz'))
  tiny_config.init.path = str(tmp_path / 'gap.npz')
  with pytest.raises(UsageError, match=r'does not fit the model: 1 missing: cls'):
    loop.train_and_evaluate(tiny_config, str(tmp_path / 'run2'))


@pytest.mark.parametrize('name,dataset,steps', [('cifar10', 'cifar10', 10_000), ('cifar100', 'cifar100', 10_000),
                                                ('pets', 'oxford_iiit_pet', 500),
                                                ('flowers102', 'oxford_flowers102', 500)])
def test_finetune_configs_use_the_papers_setup(name, dataset, steps):
  import importlib
  config = importlib.import_module(f'configs.finetune_{name}').get_config()
  config.lock()
  assert config.dataset.name == dataset and config.total_steps == steps
  assert (config.batch_size, config.input.image_size, config.model.variant) == (512, 384, 'B/16')
  opt = config.optimizer
  assert (opt.name, opt.momentum, opt.schedule, opt.weight_decay, opt.grad_clip_norm) == ('sgd', 0.9, 'cosine', 0.0, 1.0)
  assert opt.learning_rate in (0.001, 0.003, 0.01, 0.03)
  assert config.init.path.endswith('.npz') and config.init.reset_head
