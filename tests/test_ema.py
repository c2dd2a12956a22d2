"""EMA of the parameters: the update rule, checkpoints and bitwise resume, eval_ema metrics, --ema loading."""

import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest

from vit_jax.checkpoint import run as run_lib
from vit_jax.errors import UsageError
from vit_jax.training import loop, memory, sharding, steps


def _ema_config(config, total_steps):
  config.ema.decay = 0.9
  config.ema.warmup = True
  config.total_steps = total_steps
  config.eval_every_steps = config.checkpoint_every_steps = 2
  return config


def test_default_state_has_no_ema_leaves(tiny_config):
  run = loop.setup(tiny_config, sharding.make_mesh(tiny_config))
  state = run.abstract_state
  assert state.ema_params is None
  # The default train state is the same tree as before EMA existed: old checkpoints still restore.
  assert len(jax.tree.leaves(state)) == 1 + len(jax.tree.leaves(state.params)) + len(
      jax.tree.leaves(state.opt_state))
  assert 'ema_gib' not in memory.report(state, run.state_sharding)
  tiny_config.ema.decay = 0.99  # The memory report counts the average as one more copy of the params.
  run = loop.setup(tiny_config, sharding.make_mesh(tiny_config))
  values = memory.report(run.abstract_state, run.state_sharding)
  assert values['ema_gib'] == values['params_gib'] > 0


def test_train_step_moves_the_average_with_warmup(tiny_config):
  tiny_config.ema.decay = 0.99
  tiny_config.ema.warmup = True
  run = loop.setup(tiny_config, sharding.make_mesh(tiny_config))
  state = jax.jit(run.init_fn, out_shardings=run.state_sharding)(jax.random.key(0))
  np.testing.assert_array_equal(jax.device_get(state.ema_params['head']['kernel']),
                                jax.device_get(state.params['head']['kernel']))
  rng = np.random.default_rng(0)
  batch = sharding.global_batch({'image': rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
                                 'label': np.arange(16, dtype=np.int32) % 10}, run.batch_sharding)
  for step in range(3):
    before = jax.device_get(state.ema_params)
    state, _ = run.step_fn(state, batch, jax.random.key(1))
    decay = min(0.99, (1 + step) / (10 + step))  # Warm-up: 0.1, 0.18, 0.25 here.
    expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, before, jax.device_get(state.params))
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
                 jax.device_get(state.ema_params), expected)
  assert float(steps.ema_decay_at(np.int32(10**6), 0.99, True)) == pytest.approx(0.99)


def test_resume_reproduces_the_average_bitwise_and_evaluates_it(tiny_config, tmp_path):
  """Also: export/evaluate --ema read the average, and fine-tuning starts it at the pretrained params."""
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  final = loop.train_and_evaluate(_ema_config(tiny_config.copy_and_resolve_references(), 4), straight)
  # The same run stopped after its checkpoint at step 2 (a copy without the later one), resumed.
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '4'))
  loop.train_and_evaluate(_ema_config(tiny_config.copy_and_resolve_references(), 4), resumed)

  for ema in (True, False):
    a, b = run_lib.load_workdir(straight, ema=ema), run_lib.load_workdir(resumed, ema=ema)
    assert a.step == b.step == 4 and a.ema == ema
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a.params), jax.device_get(b.params))
  raw, ema = run_lib.load_workdir(straight), run_lib.load_workdir(straight, ema=True)
  assert not np.array_equal(jax.device_get(raw.params['head']['kernel']),
                            jax.device_get(ema.params['head']['kernel']))

  with open(os.path.join(straight, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  evals = [row for row in rows if 'eval/accuracy' in row]
  assert [row['step'] for row in evals] == [2, 4]
  assert all(0 <= row['eval_ema/accuracy'] <= 1 and row['eval_ema/num_examples'] == 360 for row in evals)
  assert final['eval_ema/loss'] == evals[-1]['eval_ema/loss'] != evals[-1]['eval/loss']

  # The exported EMA parameters are what the workdir's --ema gives.
  from vit_jax.tools import evaluate, export
  written = export.export_run(ema, str(tmp_path / 'ema.npz'))
  exported = run_lib.load_exported(written['npz'])
  assert json.load(open(written['json']))['ema'] is True
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(exported.params), jax.device_get(ema.params))
  report = evaluate.evaluate_run(ema, str(tmp_path / 'eval_ema'), num_confused=0)
  assert report['ema'] and report['accuracy'] == pytest.approx(evals[-1]['eval_ema/accuracy'], abs=1e-9)

  # Fine-tuning from a checkpoint starts the average at the pretrained params, not the random init.
  config = _ema_config(tiny_config, 1)
  config.ema.decay, config.ema.warmup = 0.999999, False
  config.init.path, config.init.reset_head = straight, False
  loop.train_and_evaluate(config, str(tmp_path / 'finetuned'))
  average = jax.device_get(run_lib.load_workdir(str(tmp_path / 'finetuned'), ema=True).params)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5), average, jax.device_get(raw.params))

  # EMA cannot be switched off on resume: the checkpoints hold an average this config has no place for.
  config = _ema_config(tiny_config, 6)
  config.ema.decay, config.init.path = 0.0, ''
  with pytest.raises(UsageError, match='ema'):
    loop.train_and_evaluate(config, straight)


def test_ema_flag_errors(tiny_config):
  from tests.trained_run import trained_workdir
  workdir = trained_workdir(tiny_config)  # Trained without EMA.
  with pytest.raises(UsageError, match='trained without EMA'):
    run_lib.load_workdir(workdir, ema=True)
  with pytest.raises(UsageError, match='--ema needs --workdir'):
    run_lib.run_from_flags(None, 'model.npz', None, ema=True)
  tiny_config.ema.decay = 1.0
  with pytest.raises(UsageError, match='config.ema.decay=1.0'):
    loop.setup(tiny_config, sharding.make_mesh(tiny_config))
