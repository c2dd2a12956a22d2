"""The user's image folders: indexing, splits, corrupt files, errors, 2 processes, the launcher."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import REPO
from vit_jax.data import pipeline
from vit_jax.data.builders import image_folder
from vit_jax.errors import UsageError

CLASSES = ('cat', 'dog', 'emu')


def _write_images(folder, count, seed, size=(20, 28)):
  """`count` small JPEG/PNG files of varied sizes in `folder`."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(count):
    pixels = rng.integers(0, 256, (size[0] + i % 5, size[1] - i % 3, 3), dtype=np.uint8)
    if i % 2:
      data, name = tf.io.encode_png(pixels).numpy(), f'{i:03d}.png'
    else:
      data, name = tf.io.encode_jpeg(pixels).numpy(), f'{i:03d}.JPG'
    with open(os.path.join(folder, name), 'wb') as f:
      f.write(data)


@pytest.fixture
def folder(tmp_path):
  """3 classes of 11, 9 and 7 images, plus a corrupt, a truncated and a non-image file."""
  root = tmp_path / 'images'
  for c, (name, count) in enumerate(zip(CLASSES, (11, 9, 7))):
    _write_images(root / name, count, seed=c)
  (root / 'cat' / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not a JPEG')
  good = (root / 'dog' / '001.png').read_bytes()
  (root / 'dog' / 'truncated.png').write_bytes(good[:len(good) // 2])
  (root / 'emu' / 'notes.txt').write_text('not an image, and not counted')
  return str(root)


def _config(tiny_config, root):
  config = tiny_config
  config.dataset.name = 'image_folder'
  config.dataset.folder = root
  config.dataset.num_classes = 3
  config.dataset.test_fraction = 0.25
  config.input.image_size = 16
  config.input.train_crop = 'random_resized'
  config.input.flip = True
  return config


def test_folder_is_indexed_split_and_corrupt_files_skipped(folder, caplog):
  with caplog.at_level('WARNING'):
    index = image_folder.index_folder(folder, 0.25)
  assert index.class_names == CLASSES
  assert sorted(os.path.basename(p) for p in index.skipped) == ['corrupt.jpg', 'truncated.png']
  assert 'skipped 2 of 29 files' in caplog.text
  train_paths, train_labels = index.splits['train']
  test_paths, test_labels = index.splits['test']
  assert not set(train_paths) & set(test_paths)
  assert len(train_paths) + len(test_paths) == 27
  # round(0.25 * n) of each class is held out: 11 -> 3, 9 -> 2, 7 -> 2.
  assert np.bincount(test_labels).tolist() == [3, 2, 2]
  for path, label in zip(train_paths + test_paths, list(train_labels) + list(test_labels)):
    assert os.path.basename(os.path.dirname(path)) == CLASSES[label]
  # The split is fixed: the same on a fresh scan (no cache), whatever the run's seed.
  image_folder._scan.cache_clear()
  assert image_folder.index_folder(folder, 0.25).splits['test'][0] == test_paths


def test_source_has_the_tfds_data_source_interface(folder):
  source, names = image_folder.open_split(folder, 'train', 0.25)
  records = source.__getitems__([0, len(source) - 1])
  assert names == list(CLASSES) and len(source) == 20
  assert isinstance(records[0]['image'], bytes) and tf.io.decode_image(records[0]['image']).shape[-1] == 3
  assert records[0]['label'] == 0 and records[1]['label'] == 2


def test_presplit_folder_uses_its_splits_and_train_classes(tmp_path):
  root = tmp_path / 'presplit'
  for c, name in enumerate(CLASSES):
    _write_images(root / 'train' / name, 4, seed=c)
  _write_images(root / 'test' / 'emu', 3, seed=5)  # A test split may lack classes.
  _write_images(root / 'validation' / 'dog', 2, seed=6)
  index = image_folder.index_folder(str(root), 0.25)
  assert index.class_names == CLASSES
  assert {k: len(v[0]) for k, v in index.splits.items()} == {'train': 12, 'test': 3, 'validation': 2}
  assert set(index.splits['test'][1]) == {2} and set(index.splits['validation'][1]) == {1}
  _write_images(root / 'test' / 'yak', 1, seed=7)
  image_folder._scan.cache_clear()
  with pytest.raises(UsageError, match="Class 'yak' of split 'test'.*not a class of train/"):
    image_folder.index_folder(str(root), 0.25)


def test_bad_folders_are_clear_errors(tmp_path, tiny_config):
  (tmp_path / 'one' / 'only_class').mkdir(parents=True)
  _write_images(tmp_path / 'one' / 'only_class', 2, seed=0)
  (tmp_path / 'empty' / 'a').mkdir(parents=True)
  (tmp_path / 'empty' / 'b').mkdir(parents=True)
  (tmp_path / 'empty' / 'b' / 'readme.txt').write_text('no images here')
  cases = [(str(tmp_path / 'missing'), r'does not exist; .* --config configs/image_folder.py:PATH'),
           (str(tmp_path / 'one'), r"has 1 class sub-folder\(s\) \(only_class\); a classifier needs at least 2"),
           (str(tmp_path / 'empty'), 'holds no images'),
           ('', 'config.dataset.folder is empty')]
  for root, message in cases:
    config = _config(tiny_config, root)
    with pytest.raises(UsageError, match=message) as error:
      pipeline.open_split(config.dataset, 'train')
    assert '\n' not in str(error.value)
  config = _config(tiny_config, str(tmp_path / 'one'))
  _write_images(tmp_path / 'one' / 'second_class', 2, seed=1)
  config.dataset.num_classes = 3
  with pytest.raises(UsageError, match='has 2 classes but config.dataset.num_classes=3'):
    pipeline.open_split(config.dataset, 'train')
  config.dataset.num_classes = 2
  with pytest.raises(UsageError, match="no split 'validation'; its splits are train, test"):
    pipeline.open_split(config.dataset, 'validation')


@pytest.mark.parametrize('eval_batch_size', [4, 6])
def test_two_processes_evaluate_an_uneven_split_exactly_once(folder, tiny_config, eval_batch_size):
  config = _config(tiny_config, folder)
  config.dataset.test_fraction = 0.4  # 4 + 4 + 3 = 11 test images: uneven for every batch size here.
  config.eval_batch_size = eval_batch_size
  split = pipeline.open_split(config.dataset, 'test')
  assert len(split) == 11
  per_process = [list(pipeline.eval_iterator(config, split, i, 2)) for i in range(2)]
  assert len(per_process[0]) == len(per_process[1]) == -(-11 // eval_batch_size)
  labels = np.concatenate([np.concatenate([p[s]['label'] for p in per_process]) for s in range(len(per_process[0]))])
  mask = np.concatenate([np.concatenate([p[s]['mask'] for p in per_process]) for s in range(len(per_process[0]))])
  assert mask.sum() == 11 and mask[:11].all()
  np.testing.assert_array_equal(labels[:11], split.source.labels)


def test_two_processes_split_a_mixed_randaugmented_batch(folder, tiny_config):
  config = _config(tiny_config, folder)
  config.batch_size = 8
  config.input.randaugment.num_layers = 1
  config.input.mixup_alpha = 0.8
  config.input.cutmix_alpha = 1.0
  split = pipeline.open_split(config.dataset, 'train')
  one = pipeline.train_iterator(config, split, 0)
  two = [pipeline.train_iterator(config, split, 0, i, 2) for i in range(2)]
  for _ in range(3):  # 24 examples: crosses the epoch boundary at 20.
    whole, halves = next(one), [next(it) for it in two]
    assert whole['label'].shape == (8, 3) and whole['label'].dtype == np.float32
    np.testing.assert_allclose(whole['label'].sum(1), 1.0, atol=1e-6)
    for key in ('image', 'label'):
      np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])
  config.batch_size = 6  # 3 per process: pairs would straddle processes.
  with pytest.raises(UsageError, match='per-process batch must be even'):
    pipeline.train_iterator(config, split, 0, 0, 2)


def test_image_folder_trains_through_the_launcher(folder, tmp_path, run_command, caplog):
  workdir = tmp_path / 'run'
  result = run_command('train', '--config', os.path.join(REPO, f'configs/image_folder.py:{folder}'),
                       '--workdir', str(workdir), '--config.model.variant=tiny/4', '--config.input.image_size=16',
                       '--config.batch_size=8', '--config.eval_batch_size=8', '--config.total_steps=2',
                       '--config.log_every_steps=1', '--config.eval_every_steps=2',
                       '--config.checkpoint_every_steps=2', '--config.optimizer.warmup_steps=1',
                       '--config.input.mixup_alpha=0.2')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'skipped 2 of 29 files' in caplog.text  # absl's warning, on its own handler in this process.
  assert 'step 2/2' in result.stdout
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert [r['eval/num_examples'] for r in rows if 'eval/num_examples' in r] == [3]  # round(10%) of 11, 9, 7.
  assert all(np.isfinite(r['train/loss']) for r in rows if 'train/loss' in r)
  assert json.loads((workdir / 'config.json').read_text())['dataset']['num_classes'] == 3
