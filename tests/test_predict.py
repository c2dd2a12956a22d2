"""Prediction on image files: output format, determinism, eval preprocessing, errors, export round trip."""

import os
import re

import numpy as np
import pytest
from PIL import Image

from tests.trained_run import trained_run, trained_workdir
from vit_jax.data import pipeline
from vit_jax.checkpoint import run as run_lib
from vit_jax.tools import predict
from vit_jax.errors import UsageError

LINE = re.compile(r'^  +(\d+\.\d\d)%  (\S+)$')


@pytest.fixture
def workdir(tiny_config):
  return trained_workdir(tiny_config)


@pytest.fixture
def run(tiny_config):
  return trained_run(tiny_config)


@pytest.fixture
def images(tmp_path, tiny_config):
  """Four test-split digits as 8x8 PNG files in a folder, in record order, and their labels."""
  split = pipeline.open_split(tiny_config.dataset, 'test')
  folder = tmp_path / 'digits'
  folder.mkdir()
  labels = []
  for i in range(4):
    record = split.source[i]
    (folder / f'digit_{i}.png').write_bytes(record['image'])
    labels.append(int(record['label']))
  (folder / 'notes.txt').write_text('not an image: folders yield only image files')
  return folder, labels


def test_command_prints_top_k_per_image_and_writes_attention_maps(workdir, images, tmp_path, run_command):
  folder, _ = images
  big = tmp_path / 'big.jpg'  # Another size and format: resized as in evaluation.
  Image.open(folder / 'digit_0.png').convert('RGB').resize((37, 23)).save(big)
  maps = tmp_path / 'maps'
  result = run_command('predict', '--workdir', workdir, '--top_k', '3', '--batch_size', '2',
                       '--attention_maps', str(maps), str(folder), str(big))
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().split('\n')
  files = [os.path.join(str(folder), f'digit_{i}.png') for i in range(4)] + [str(big)]
  assert len(lines) == 5 * 5  # Per image: its path, 3 classes, the attention-map line.
  for n, path in enumerate(files):
    block = lines[5 * n:5 * n + 5]
    assert block[0] == path
    parsed = [LINE.match(line) for line in block[1:4]]
    assert all(parsed), block
    probs = [float(m.group(1)) for m in parsed]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.01
    assert {m.group(2) for m in parsed} <= {str(d) for d in range(10)}
    name = os.path.splitext(os.path.basename(path))[0]
    assert block[4] == f'  attention maps: {maps / name}_attention.png'
    assert os.path.getsize(maps / f'{name}_attention.png') > 1000
    rollout, heads = np.load(maps / f'{name}_rollout.npy'), np.load(maps / f'{name}_heads.npy')
    assert rollout.shape == (16, 16) and heads.shape == (2, 16, 16)  # tiny: 2 heads; 16 px input.
    np.testing.assert_allclose(rollout.sum(), 1.0, atol=1e-5)
    np.testing.assert_allclose(heads.sum(axis=(1, 2)), 1.0, atol=1e-5)


def test_bad_input_exits_2_with_one_line(workdir, tmp_path, run_command):
  result = run_command('predict', '--workdir', workdir, str(tmp_path / 'missing.png'))
  assert result.returncode == 2
  assert result.stderr.strip().split('\n')[-1] == f"error: No such image file or folder: '{tmp_path / 'missing.png'}'."


def test_images_get_exactly_the_eval_preprocessing(run, images):
  folder, _ = images
  from_files = predict.load_images(run.config, predict.find_images([str(folder)]))
  split = pipeline.open_split(run.config.dataset, run.config.dataset.eval_split)
  batch = next(pipeline.eval_iterator(run.config, split))
  np.testing.assert_array_equal(from_files, batch['image'][:4])


def test_predictions_are_deterministic_and_independent_of_batching(run, images):
  files = predict.find_images([str(images[0])])
  first = predict.predict_logits(run, files, batch_size=3)  # Batches of 3 and 1 (padded).
  again = predict.predict_logits(run, files, batch_size=3)
  whole = predict.predict_logits(run, files, batch_size=4)
  assert first.shape == (4, 10)
  np.testing.assert_array_equal(first, again)
  np.testing.assert_allclose(first, whole, atol=1e-5)


def test_format_predictions_lists_the_top_k_most_likely_first():
  probs = np.array([0.1, 0.6, 0.05, 0.25])
  text = predict.format_predictions('a.png', probs, ['cat', 'dog', 'fox', 'owl'], 3)
  assert text == 'a.png\n   60.00%  dog\n   25.00%  owl\n   10.00%  cat'


def test_usage_errors(run, tmp_path, workdir):
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'bad.png').write_bytes(b'not a png')
  with pytest.raises(UsageError, match='holds no image files'):
    predict.find_images([str(tmp_path / 'empty')])
  with pytest.raises(UsageError, match='Cannot decode'):
    predict.load_images(run.config, [str(tmp_path / 'bad.png')])
  with pytest.raises(UsageError, match='exactly one of --workdir'):
    run_lib.run_from_flags(workdir, 'x.npz', None)
  with pytest.raises(UsageError, match='No config.json'):
    run_lib.load_workdir(str(tmp_path))
  with pytest.raises(UsageError, match='--top_k=0'):
    predict.predict_main([str(tmp_path)], workdir=workdir, top_k_classes=0)


def test_class_sub_folders_are_read_and_a_run_prints_in_one_line(run, images, tmp_path):
  """The layout the README teaches for training (one sub-folder per class) predicts as it is; analyze
  --images skips a file that does not decode, as training and predict do."""
  from vit_jax.tools import analyze
  folder, labels = images
  classes = tmp_path / 'classes'
  for i, label in enumerate(labels):
    os.makedirs(classes / str(label), exist_ok=True)
    os.link(folder / f'digit_{i}.png', classes / str(label) / f'digit_{i}.png')
  (classes / str(labels[0]) / 'broken.png').write_bytes(b'not a png')
  found = predict.find_images([str(classes)])
  assert sorted(os.path.basename(f) for f in found) == ['broken.png'] + [f'digit_{i}.png' for i in range(4)]
  assert found == sorted(found)
  batches, described = analyze.analysis_images(run, str(classes), 128, None, 8)
  assert described == f'4 images of {classes}' and sum(len(b) for b in batches) == 4
  import jax
  count = sum(leaf.size for leaf in jax.tree.leaves(run.params))
  assert repr(run) == f'Run(tiny/4, {count:,} parameters, 10 classes, step 6)'  # Not 2,500 lines.
