"""Test setup: 8 virtual CPU devices, and the bundled digits prepared once per session."""

import os

# Must happen before JAX initialises its backends.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ['VIT_JAX_COMPILATION_CACHE'] = '0'  # Commands run by tests leave the user's cache alone.

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A tfds data directory holding the prepared sklearn_digits dataset."""
  from vit_jax.data.builders.sklearn_digits import SklearnDigits
  path = str(tmp_path_factory.mktemp('tfds'))
  SklearnDigits(data_dir=path, file_format='array_record').download_and_prepare()
  return path


@pytest.fixture
def tiny_config(data_dir):
  """The quickstart config shrunk to the tiny variant and a few steps."""
  from configs import quickstart
  config = quickstart.get_config()
  config.dataset.data_dir = data_dir
  config.model.variant = 'tiny/4'
  config.model.hidden_size = None
  config.model.num_layers = None
  config.model.mlp_dim = None
  config.model.num_heads = None
  config.batch_size = 16
  config.eval_batch_size = 64
  config.total_steps = 6
  config.log_every_steps = 2
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 3
  config.optimizer.warmup_steps = 2
  return config
