"""Freezing parameters by name (config.optimizer.freeze): no optimizer state, bitwise unchanged; the linear-probe config."""

import math

import jax
import numpy as np
import pytest

from tests.trained_run import trained_workdir
from vit_jax.checkpoint import run as run_lib
from vit_jax.errors import UsageError
from vit_jax.training import loop, memory, optim, sharding

PROBE = '^(?!head/)'


def _shrink(config, tiny_config):
  """`config` with tiny_config's model, data and durations."""
  for key in ('model', 'dataset', 'batch_size', 'eval_batch_size', 'total_steps', 'log_every_steps',
              'eval_every_steps', 'checkpoint_every_steps'):
    config[key] = tiny_config[key]
  config.input.image_size = tiny_config.input.image_size
  return config


def test_frozen_mask_patterns(tiny_config):
  params = loop.setup(tiny_config, sharding.make_mesh(tiny_config)).abstract_state.params
  paths = {optim.parameter_path(p): f for p, f in jax.tree_util.tree_flatten_with_path(
      optim.frozen_mask(params, PROBE))[0]}
  assert {p for p, frozen in paths.items() if not frozen} == {'head/kernel', 'head/bias'}
  assert paths['Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel']
  embedding = optim.frozen_mask(params, '^(embedding/|cls$|Transformer/posembed_input/)')
  assert sum(jax.tree.leaves(embedding)) == 4  # Patch kernel and bias, class token, position embeddings.
  for pattern, message in [('^nothing/', 'matches no parameter'), ('.', 'matches every parameter'),
                           ('(', 'not a regular expression')]:
    with pytest.raises(UsageError, match=message):
      optim.frozen_mask(params, pattern)


def test_frozen_parameters_get_no_optimizer_state(tiny_config):
  full = loop.setup(tiny_config, sharding.make_mesh(tiny_config))
  tiny_config.optimizer.freeze = PROBE
  probe = loop.setup(tiny_config, sharding.make_mesh(tiny_config))
  head = sum(math.prod(x.shape) for x in jax.tree.leaves(probe.abstract_state.params['head']))
  sizes = [math.prod(x.shape) for x in jax.tree.leaves(probe.abstract_state.opt_state)]
  assert sum(sizes) == 2 * head + sizes.count(1)  # Adam's two moments of the head, plus step counts.
  full_bytes = memory.report(full.abstract_state, full.state_sharding)['optimizer_gib']
  probe_bytes = memory.report(probe.abstract_state, probe.state_sharding)['optimizer_gib']
  assert probe_bytes < full_bytes / 20


def test_linear_probe_config_trains_only_the_head(tiny_config, tmp_path):
  from configs import linear_probe
  source = trained_workdir(tiny_config)
  config = _shrink(linear_probe.get_config(), tiny_config)
  config.total_steps = config.eval_every_steps = config.checkpoint_every_steps = 4
  config.init.path = source
  assert config.optimizer.freeze == PROBE and config.init.reset_head
  final = loop.train_and_evaluate(config, str(tmp_path / 'probe'))

  before = jax.device_get(run_lib.load_workdir(source).params)
  after = jax.device_get(run_lib.load_workdir(str(tmp_path / 'probe')).params)
  head_before, head_after = before.pop('head'), after.pop('head')
  jax.tree.map(np.testing.assert_array_equal, after, before)  # Bitwise: frozen.
  assert not np.array_equal(head_after['kernel'], head_before['kernel'])
  assert np.abs(head_after['kernel']).max() > 0  # Trained from the zero head.
  assert 0 <= final['eval/accuracy'] <= 1
