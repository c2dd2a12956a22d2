"""Few-shot linear evaluation: the closed-form solver, the shot sampling, the periodic evaluator and the command."""

import json
import os

import jax
import numpy as np
import pytest
from sklearn.linear_model import Ridge

from vit_jax.checkpoint.run import Run
from vit_jax.errors import UsageError
from vit_jax.models import model_from_config
from vit_jax.tools import fewshot as fewshot_tool
from vit_jax.training import fewshot

SHOTS = (1, 5, 10, 25)


@pytest.mark.parametrize('n, d', [(60, 12), (12, 40)])  # Both branches: n >= d and n < d.
def test_solver_matches_lstsq_and_sklearn_ridge(n, d):
  rng = np.random.default_rng(0)
  features = rng.normal(size=(n, d)) * rng.uniform(0.1, 5, size=d) + rng.normal(size=d)
  labels = np.arange(n) % 4
  l2 = 3.0
  classifier = fewshot.fit(features, labels, 4, l2)

  x = fewshot.design_matrix(features, features.mean(0), features.std(0) + 1e-5)
  y = 2.0 * np.eye(4)[labels] - 1.0
  assert set(np.unique(y)) == {-1.0, 1.0} and np.all(x[:, -1] == fewshot.BIAS_FEATURE)
  # Ridge = least squares on the system augmented with sqrt(l2) * I rows.
  augmented_x = np.concatenate([x, np.sqrt(l2) * np.eye(d + 1)])
  augmented_y = np.concatenate([y, np.zeros((d + 1, 4))])
  expected = np.linalg.lstsq(augmented_x, augmented_y, rcond=None)[0]
  np.testing.assert_allclose(classifier.weights, expected, rtol=1e-6, atol=1e-9)
  ridge = Ridge(alpha=l2, fit_intercept=False, solver='cholesky').fit(x, y)
  np.testing.assert_allclose(classifier.weights, ridge.coef_.T, rtol=1e-6, atol=1e-9)
  np.testing.assert_array_equal(fewshot.predict(classifier, features), np.argmax(x @ expected, 1))


def test_shots_are_per_class_nested_and_seeded():
  labels = np.repeat(np.arange(3), [30, 30, 3])  # Class 2 has fewer examples than 5 shots.
  drawn = fewshot.sample_shots(labels, 3, (1, 5), seed=0)
  assert [np.sum(labels[drawn[1]] == c) for c in range(3)] == [1, 1, 1]
  assert [np.sum(labels[drawn[5]] == c) for c in range(3)] == [5, 5, 3]
  assert set(drawn[1]) <= set(drawn[5])
  again, other = fewshot.sample_shots(labels, 3, (5,), 0)[5], fewshot.sample_shots(labels, 3, (5,), 1)[5]
  np.testing.assert_array_equal(drawn[5], again)
  assert set(drawn[5]) != set(other)


def test_separable_features_are_classified_exactly():
  rng = np.random.default_rng(1)
  centres = rng.normal(size=(5, 16)) * 10
  labels = np.arange(500) % 5
  features = centres[labels] + rng.normal(size=(500, 16))
  accuracy = fewshot.fewshot_accuracies(features[:250], labels[:250], features[250:], labels[250:], 5,
                                        (1, 5), seeds=2, l2_reg=2.0**10)
  assert accuracy[5] == 1.0 and accuracy[1] > 0.9


@pytest.fixture(scope='module')
def fewshot_workdir(tmp_path_factory, data_dir):
  """A tiny digits run trained long enough to learn (120 steps: 50-66% few-shot accuracy against 17-40%
  untrained), with the few-shot evaluator on."""
  from configs import quickstart
  from vit_jax.training import loop
  config = quickstart.get_config()
  config.dataset.data_dir = data_dir
  config.model.variant = 'tiny/4'
  config.model.hidden_size = config.model.num_layers = config.model.mlp_dim = config.model.num_heads = None
  config.model.dropout_rate = 0.0
  config.input.train_crop = 'resize'
  config.optimizer.label_smoothing = 0.0
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 10
  config.batch_size, config.eval_batch_size = 32, 64
  config.total_steps = config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 120
  config.fewshot.every_steps = 60
  config.fewshot.datasets = {'digits': ('sklearn_digits', 'train', 'test')}
  workdir = str(tmp_path_factory.mktemp('fewshot_run'))
  loop.train_and_evaluate(config, workdir)
  return workdir


def test_trained_model_beats_random_init_at_every_shot_count(fewshot_workdir):
  with open(os.path.join(fewshot_workdir, 'metrics.jsonl')) as f:
    rows = [row for row in map(json.loads, f) if 'fewshot/digits/1shot' in row]
  assert [row['step'] for row in rows] == [60, 120]  # Every fewshot.every_steps, and at the end.
  trained = {k: rows[-1][f'fewshot/digits/{k}shot'] for k in SHOTS}
  assert os.listdir(os.path.join(fewshot_workdir, 'tensorboard'))

  # The same architecture, untrained, through the command's library function.
  from vit_jax.config.files import load_config
  config = load_config(os.path.join(fewshot_workdir, 'config.json'))
  model = model_from_config(config)
  params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))['params']
  result = fewshot_tool.fewshot_run(Run(config, model, params, [], 0), 'sklearn_digits', SHOTS)
  assert (result['num_train'], result['num_test'], result['num_classes']) == (1437, 360, 10)
  random = result['accuracy']
  print('trained', trained, 'random', random)
  for k in SHOTS:
    assert trained[k] > random[k] + 0.1, (k, trained, random)
  assert trained[1] < trained[25]


def test_command_prints_one_line_per_shot_count(fewshot_workdir, data_dir, run_command):
  result = run_command('fewshot', f'--workdir={fewshot_workdir}', '--dataset=sklearn_digits', '--shots=1,5',
                       '--seeds=2')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert lines[0].startswith('sklearn_digits: 10 classes') and len(lines) == 3
  for line, k in zip(lines[1:], (1, 5)):
    assert line.startswith(f'{k}-shot accuracy: 0.') and len(line.split(': ')[1]) == 6

  bad = run_command('fewshot', f'--workdir={fewshot_workdir}', '--dataset=sklearn_digits', '--shots=0')
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith('error: vit-jax fewshot')
  # A dataset that is not prepared: the fix names the command's own flag, and no tfds warning shows.
  missing = run_command('fewshot', f'--workdir={fewshot_workdir}', '--dataset=cifar10',
                        f'--data_dir={fewshot_workdir}/no_such_dir')
  assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
  assert missing.stderr.rstrip().endswith('or point --data_dir at a prepared copy.')


def test_evaluator_config_errors(tiny_config):
  from vit_jax.training import loop, sharding
  tiny_config.fewshot.every_steps = 3
  mesh = sharding.make_mesh(tiny_config)
  run = loop.setup(tiny_config, mesh)
  with pytest.raises(UsageError, match='config.fewshot.datasets is empty'):
    fewshot.Evaluator(tiny_config, run.model, run.state_sharding.params, run.batch_sharding)
  tiny_config.fewshot.shots = (0, 5)
  with pytest.raises(UsageError, match='shots'):
    fewshot.Evaluator(tiny_config, run.model, run.state_sharding.params, run.batch_sharding)
  with pytest.raises(UsageError, match='no_such_dataset'):
    fewshot.dataset_config(tiny_config, 'no_such_dataset', 'train', 'test')


def test_image_folder_dataset(tiny_config, tmp_path):
  import tensorflow as tf
  colours = {'red': (220, 30, 30), 'green': (30, 200, 40), 'blue': (20, 40, 230)}
  rng = np.random.default_rng(0)
  for split, count in (('train', 6), ('test', 4)):
    for name, colour in colours.items():
      os.makedirs(tmp_path / split / name)
      for i in range(count):
        pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
        (tmp_path / split / name / f'{i}.png').write_bytes(tf.io.encode_png(pixels).numpy())
  config = fewshot.dataset_config(tiny_config, str(tmp_path), 'train', 'test')
  assert (config.dataset.name, config.dataset.num_classes) == ('image_folder', 3)
  assert tiny_config.dataset.name == 'sklearn_digits'  # The model's config is left as it was.

  model = model_from_config(tiny_config)
  params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))['params']
  result = fewshot_tool.fewshot_run(Run(tiny_config, model, params, [], 0), str(tmp_path), (1, 5), seeds=2)
  assert (result['num_train'], result['num_test'], result['num_classes']) == (18, 12, 3)
  assert result['accuracy'][5] == 1.0  # Colours separate even in random features.
