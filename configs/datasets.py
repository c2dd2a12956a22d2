"""Dataset presets: tfds name, splits, classes, image size and pixel range, in one table.

A config file picks a dataset with one call, after which its own fields still
override anything:

  from configs import datasets
  from vit_jax.config import defaults
  config = datasets.apply(defaults.get_config(), 'cifar100')

Facts checked against the tfds catalog (tensorflow_datasets 4.9): split names
and sizes, number of classes, and which datasets need manual downloads
(imagenet2012, resisc45: set config.dataset.manual_dir). Datasets that tfds
ships with a single `train` split (eurosat, resisc45, uc_merced) are split
80/20 by tfds slicing here. imagenet_v2 has only a `test` split: it is for
evaluating a model trained on imagenet2012 (its labels are the same 1,000).

Every preset feeds the model 224 px images in [-1, 1], as the published ViT
checkpoints expect; change `config.input.image_size` for another resolution.
"""

import dataclasses

import ml_collections


@dataclasses.dataclass(frozen=True)
class Preset:
  tfds_name: str  # Name (and config) in the tfds catalog.
  train_split: str  # tfds split string for training.
  eval_split: str  # tfds split string for evaluation.
  num_classes: int
  num_train_examples: int  # Size of train_split, e.g. to turn epochs into steps.
  native_size: str  # Size of the stored images, for reference.
  image_size: int = 224  # Side of the images fed to the model.
  eval_crop_fraction: float = 1.0  # Central-crop fraction at evaluation.
  value_range: tuple[float, float] = (-1.0, 1.0)


PRESETS = {
    'imagenet2012': Preset('imagenet2012', 'train', 'validation', 1000, 1_281_167, 'varies',
                           eval_crop_fraction=0.875),  # Manual download; 50,000 validation images.
    'imagenet_v2': Preset('imagenet_v2/matched-frequency', '', 'test', 1000, 0, 'varies',
                          eval_crop_fraction=0.875),  # Evaluation only: 10,000 test images.
    'cifar10': Preset('cifar10', 'train', 'test', 10, 50_000, '32x32'),  # 10,000 test.
    'cifar100': Preset('cifar100', 'train', 'test', 100, 50_000, '32x32'),  # 10,000 test; fine labels.
    'oxford_iiit_pet': Preset('oxford_iiit_pet', 'train', 'test', 37, 3_680, 'varies'),  # 3,669 test.
    'oxford_flowers102': Preset('oxford_flowers102', 'train+validation', 'test', 102, 2_040,
                                'varies'),  # 1,020 + 1,020 train/validation, 6,149 test.
    'eurosat': Preset('eurosat/rgb', 'train[:80%]', 'train[80%:]', 10, 21_600, '64x64'),  # 27,000 in all.
    'resisc45': Preset('resisc45', 'train[:80%]', 'train[80%:]', 45, 25_200, '256x256'),  # Manual; 31,500.
    'uc_merced': Preset('uc_merced', 'train[:80%]', 'train[80%:]', 21, 1_680, '256x256'),  # 2,100 in all.
}


def apply(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Sets the dataset and input fields of `config` from preset `name`; returns `config`."""
  if name not in PRESETS:
    raise ValueError(f'Unknown dataset preset {name!r}; presets: {", ".join(PRESETS)}.')
  preset = PRESETS[name]
  config.dataset.name = preset.tfds_name
  config.dataset.train_split = preset.train_split
  config.dataset.eval_split = preset.eval_split
  config.dataset.num_classes = preset.num_classes
  config.input.image_size = preset.image_size
  config.input.eval_crop_fraction = preset.eval_crop_fraction
  config.input.normalization = 'value_range'
  config.input.value_range = preset.value_range
  return config
