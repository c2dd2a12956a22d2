"""The handwritten digits that ship inside scikit-learn, as a tfds dataset.

1,797 real 8x8 grey-scale images of the digits 0-9 (the test part of the UCI
"Optical Recognition of Handwritten Digits" set, as `sklearn.datasets.load_digits`
returns it). Preparing it needs no network: the pixels come from the
scikit-learn wheel. It is the offline default that makes the quickstart run.

Split (fixed, documented): the example with index `i` in `load_digits()` order
goes to `test` when `i % 5 == 0` (360 images) and to `train` otherwise (1,437).
Pixel values 0..16 are scaled to 0..255 (`round(v * 255 / 16)`).
"""

import numpy as np
import tensorflow_datasets as tfds

NUM_TEST_EXAMPLES = 360
NUM_TRAIN_EXAMPLES = 1437


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits, split 1437 train / 360 test."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships with scikit-learn.
    return {
        'train': self._generate_examples(is_test=False),
        'test': self._generate_examples(is_test=True),
    }

  def _generate_examples(self, is_test: bool):
    from sklearn.datasets import load_digits  # Only needed while preparing.

    digits = load_digits()
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
      if (index % 5 == 0) != is_test:
        continue
      pixels = np.round(image * 255.0 / 16.0).astype(np.uint8)[..., None]
      yield index, {'image': pixels, 'label': int(label)}
