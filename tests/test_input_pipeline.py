"""The bundled digits builder and the input pipeline's order, slicing and eval coverage."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from vit_jax.data import pipeline, preprocess
from vit_jax.data.builders import sklearn_digits
from vit_jax.errors import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_digits_builder_splits_and_content(tiny_config):
  train = pipeline.open_split(tiny_config.dataset, 'train')
  test = pipeline.open_split(tiny_config.dataset, 'test')
  assert (len(train), len(test)) == (sklearn_digits.NUM_TRAIN_EXAMPLES, sklearn_digits.NUM_TEST_EXAMPLES)
  assert test.class_names == [str(d) for d in range(10)]
  # The test split holds exactly the images with index % 5 == 0, scaled to 0..255.
  import tensorflow as tf
  digits = load_digits()
  expected = {(np.round(digits.images[i] * 255 / 16).astype(np.uint8).tobytes(), int(digits.target[i]))
              for i in range(0, 1797, 5)}
  got = {(tf.io.decode_png(r['image']).numpy()[..., 0].tobytes(), int(r['label']))
         for r in test.source.__getitems__(list(range(len(test))))}
  assert got == expected


def _eval_labels_and_masks(config, split, process_count):
  per_process = []
  for index in range(process_count):
    batches = list(pipeline.eval_iterator(config, split, index, process_count))
    per_process.append(batches)
  num_batches = {len(b) for b in per_process}
  assert len(num_batches) == 1, 'every process must run the same number of eval steps'
  return per_process


@pytest.mark.parametrize('eval_batch_size,process_count', [(64, 1), (64, 2), (100, 2), (7, 1), (360, 2), (512, 4)])
def test_eval_visits_every_example_exactly_once(tiny_config, eval_batch_size, process_count):
  tiny_config.eval_batch_size = eval_batch_size
  if eval_batch_size % process_count:
    pytest.skip('batch must split over processes')
  split = pipeline.open_split(tiny_config.dataset, 'test')
  per_process = _eval_labels_and_masks(tiny_config, split, process_count)
  masks = np.concatenate([b['mask'] for batches in per_process for b in batches])
  assert masks.sum() == len(split) == 360
  # Reassemble global batches in process order: real examples are the first N positions.
  labels, mask = [], []
  for step in range(len(per_process[0])):
    labels.append(np.concatenate([p[step]['label'] for p in per_process]))
    mask.append(np.concatenate([p[step]['mask'] for p in per_process]))
  labels, mask = np.concatenate(labels), np.concatenate(mask)
  assert mask[:360].all() and not mask[360:].any()
  all_labels = np.array([r['label'] for r in split.source.__getitems__(list(range(360)))])
  np.testing.assert_array_equal(labels[:360], all_labels)


def test_train_batch_independent_of_process_count(tiny_config):
  split = pipeline.open_split(tiny_config.dataset, 'train')
  tiny_config.batch_size = 32
  one = pipeline.train_iterator(tiny_config, split, start_step=0)
  two = [pipeline.train_iterator(tiny_config, split, 0, i, 2) for i in range(2)]
  for _ in range(3):
    whole = next(one)
    halves = [next(it) for it in two]
    np.testing.assert_array_equal(np.concatenate([h['image'] for h in halves]), whole['image'])
    np.testing.assert_array_equal(np.concatenate([h['label'] for h in halves]), whole['label'])


def test_train_positions_are_disjoint_and_cover_each_epoch():
  n, batch = 50, 8
  seen = []
  for process in range(2):
    it = pipeline.train_positions(n, batch, seed=3, start_step=0, process_index=process, process_count=2)
    seen.append([next(it) for _ in range(25)])  # 25 steps * 8 = 200 = 4 epochs
  for step in range(25):
    assert not set(seen[0][step][1]) & set(seen[1][step][1])
  records = np.concatenate([np.concatenate([seen[0][s][0], seen[1][s][0]]) for s in range(25)])
  for epoch in range(4):
    assert sorted(records[epoch * n:(epoch + 1) * n]) == list(range(n))


def test_train_order_is_seeded_and_resumable(tiny_config):
  split = pipeline.open_split(tiny_config.dataset, 'train')
  first = pipeline.train_iterator(tiny_config, split, start_step=0)
  batches = [next(first) for _ in range(4)]
  resumed = pipeline.train_iterator(tiny_config, split, start_step=2)
  np.testing.assert_array_equal(next(resumed)['image'], batches[2]['image'])
  tiny_config.seed = 1
  other = pipeline.train_iterator(tiny_config, split, start_step=0)
  assert not np.array_equal(next(other)['label'], batches[0]['label'])


def test_train_images_have_model_shape_and_range(tiny_config):
  split = pipeline.open_split(tiny_config.dataset, 'train')
  tiny_config.input.image_size = 16
  tiny_config.input.train_crop = 'random_resized'
  tiny_config.input.crop_min_area = 0.3
  batch = next(pipeline.train_iterator(tiny_config, split, 0))
  assert batch['image'].shape == (16, 16, 16, 3) and batch['image'].dtype == np.float32
  assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
  assert batch['label'].dtype == np.int32 and batch['label'].max() < 10


def test_map_functions_traced_without_autograph_give_the_same_batches(tiny_config, monkeypatch):
  """The pipeline maps its functions as written (`preprocess.plain_graph`, no AutoGraph rewrite, about 1 s
  of every process start); with AutoGraph's rewrite the batches are the same, augmentations on."""
  split = pipeline.open_split(tiny_config.dataset, 'train')
  tiny_config.input.train_crop = 'random_resized'
  tiny_config.input.randaugment.num_layers = 2
  tiny_config.input.randaugment.magnitude = 9
  tiny_config.input.mixup_alpha = 0.2
  tiny_config.input.cutmix_alpha = 1.0

  def batches():
    train = pipeline.train_iterator(tiny_config, split, start_step=0)
    return [next(train) for _ in range(2)] + [next(pipeline.eval_iterator(tiny_config, split))]

  plain = batches()
  monkeypatch.setattr(preprocess, 'plain_graph', lambda fn: fn)  # Dataset.map's default: AutoGraph on.
  converted = batches()
  for a, b in zip(plain, converted):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert plain[0]['label'].shape == (tiny_config.batch_size, 10)  # Mixed: soft labels.


def test_missing_dataset_is_a_clear_error(tiny_config, tmp_path):
  tiny_config.dataset.name = 'cifar10'
  tiny_config.dataset.data_dir = str(tmp_path)
  with pytest.raises(UsageError, match=f"'cifar10' is not prepared in {tmp_path}.*`vit-jax prepare cifar10 "
                                       f"--data_dir={tmp_path}`"):
    pipeline.open_split(tiny_config.dataset, 'train')
  tiny_config.dataset.name = 'no_such_dataset_xyz'
  with pytest.raises(UsageError, match='Unknown dataset'):
    pipeline.open_split(tiny_config.dataset, 'train')


def test_batch_not_divisible_by_processes_is_an_error():
  with pytest.raises(UsageError, match='not divisible by the 3 processes'):
    pipeline.local_batch_size(32, 3)


def test_dataset_presets_agree_with_the_tfds_catalog(tmp_path):
  """Each preset names a tfds dataset whose label feature has the preset's class count."""
  import tensorflow_datasets as tfds
  from configs import datasets
  from vit_jax.config import defaults
  for name, preset in datasets.PRESETS.items():
    builder = tfds.builder(preset.tfds_name, data_dir=str(tmp_path))
    assert builder.info.features['label'].num_classes == preset.num_classes, name
    assert 'image' in builder.info.features, name
    config = datasets.apply(defaults.get_config(), name)
    assert (config.dataset.name, config.dataset.num_classes) == (preset.tfds_name, preset.num_classes)
  with pytest.raises(ValueError, match='Unknown dataset preset'):
    datasets.apply(defaults.get_config(), 'imagenet')


def test_split_strings_combine_and_slice(tiny_config):
  both = pipeline.open_split(tiny_config.dataset, 'train+test')
  part = pipeline.open_split(tiny_config.dataset, 'train[:10%]')
  assert (len(both), len(part)) == (1797, 144)


class ManualToyDigits(sklearn_digits.SklearnDigits):
  """The digits, but prepared from a 'manually downloaded' file (tests tfds manual_dir)."""
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'Place digits.txt in manual_dir.'

  def _split_generators(self, dl_manager):
    assert (dl_manager.manual_dir / 'digits.txt').exists(), 'digits.txt missing from manual_dir'
    return super()._split_generators(dl_manager)


def test_manual_dir_prepares_a_manual_dataset(tiny_config, tmp_path):
  tiny_config.dataset.name = 'manual_toy_digits'
  tiny_config.dataset.data_dir = str(tmp_path / 'tfds')
  with pytest.raises(UsageError, match='from its manually downloaded files.*vit-jax prepare manual_toy_digits '
                                      '.*--manual_dir=.*config.dataset.manual_dir'):
    pipeline.open_split(tiny_config.dataset, 'test')
  tiny_config.dataset.manual_dir = str(tmp_path / 'no_such_dir')
  with pytest.raises(UsageError, match='is not a directory'):
    pipeline.open_split(tiny_config.dataset, 'test')
  manual = tmp_path / 'manual'
  manual.mkdir()
  tiny_config.dataset.manual_dir = str(manual)
  with pytest.raises(UsageError, match='Preparing .* failed: Manual directory .* is empty'):
    pipeline.open_split(tiny_config.dataset, 'test')
  (manual / 'digits.txt').write_text('here')
  assert len(pipeline.open_split(tiny_config.dataset, 'test')) == 360


def test_mean_std_normalization_and_bad_keys(tiny_config):
  split = pipeline.open_split(tiny_config.dataset, 'test')
  tiny_config.input.normalization = 'mean_std'
  tiny_config.input.mean = (0.5, 0.5, 0.5)
  tiny_config.input.std = (0.25, 0.25, 0.25)
  image = next(pipeline.eval_iterator(tiny_config, split))['image']
  assert image.min() >= -2.0 - 1e-6 and image.max() <= 2.0 + 1e-6 and image.min() < -1.5
  tiny_config.input.normalization = 'imagenet'
  with pytest.raises(UsageError, match="normalization 'imagenet'"):
    pipeline.eval_iterator(tiny_config, split)
  tiny_config.input.normalization = 'value_range'
  tiny_config.input.randaugment.magnitude = 12
  with pytest.raises(UsageError, match='magnitude in 0..10'):
    pipeline.train_iterator(tiny_config, split, 0)


class HandMadeStripes(tfds.core.GeneratorBasedBuilder):
  """Two classes of 8x8 PNGs (horizontal / vertical stripes) that the test writes into manual_dir."""
  VERSION = tfds.core.Version('1.0.0')
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'Put the PNG files horizontal_*.png and vertical_*.png in manual_dir.'

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(8, 8, 1)),
        'label': tfds.features.ClassLabel(names=['horizontal', 'vertical'])}))

  def _split_generators(self, dl_manager):
    files = sorted(dl_manager.manual_dir.glob('*.png'))
    return {'train': self._generate_examples(files[2:]), 'test': self._generate_examples(files[:2])}

  def _generate_examples(self, files):
    for path in files:
      yield path.name, {'image': str(path), 'label': path.name.split('_')[0]}


def test_prepare_command_builds_a_dataset_that_training_reads(run_command, tmp_path):
  """`vit-jax prepare` runs a tfds builder (here one whose files the test makes, so nothing is
  downloaded) into --data_dir as array_record; the not-prepared error names that command and shows no
  tfds warnings about the folders it searched."""
  from PIL import Image
  manual, data_dir = tmp_path / 'manual', tmp_path / 'no_such' / 'tfds'
  manual.mkdir()
  for i in range(6):
    stripes = np.zeros((8, 8), np.uint8)
    stripes[::2] = 255
    Image.fromarray(stripes if i % 2 else stripes.T).save(manual / f'{"horizontal" if i % 2 else "vertical"}_{i}.png')

  config = ['train', '--config', os.path.join(REPO, 'configs', 'quickstart.py'), '--workdir', str(tmp_path / 'run'),
            '--config.dataset.name=hand_made_stripes', f'--config.dataset.data_dir={data_dir}',
            '--config.dataset.num_classes=2']
  missing = run_command(*config)
  assert missing.returncode == 2, missing.stderr
  assert missing.stderr.strip().splitlines() == [
      f"error: Dataset 'hand_made_stripes' is not prepared in {data_dir}. Prepare it there once from its "
      f'manually downloaded files: `vit-jax prepare hand_made_stripes --data_dir={data_dir} '
      '--manual_dir=FOLDER_OF_THE_FILES`, or set config.dataset.manual_dir to prepare it at start; or point '
      'config.dataset.data_dir at a prepared copy.']
  assert not os.path.exists(tmp_path / 'run')

  prepared = run_command('prepare', 'hand_made_stripes', '--data_dir', str(data_dir), '--manual_dir', str(manual))
  assert prepared.returncode == 0 and not prepared.stderr, prepared.stderr
  assert 'Prepared \'hand_made_stripes\': train 4, test 2 examples' in prepared.stdout
  dataset = tiny_dataset('hand_made_stripes', str(data_dir))
  split = pipeline.open_split(dataset, 'train')
  assert len(split) == 4 and split.class_names == ['horizontal', 'vertical']
  again = run_command('prepare', 'hand_made_stripes', '--data_dir', str(data_dir))
  assert again.returncode == 0 and 'already prepared' in again.stdout

  unknown = run_command('prepare', 'no_such_dataset_xyz')
  assert unknown.returncode == 2 and unknown.stderr.startswith("error: Unknown dataset 'no_such_dataset_xyz'")


def tiny_dataset(name: str, data_dir: str):
  from vit_jax.config import defaults
  dataset = defaults.get_config().dataset
  dataset.name, dataset.data_dir, dataset.num_classes = name, data_dir, 2
  return dataset
