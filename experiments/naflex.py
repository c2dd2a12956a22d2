"""NaFlex (native aspect ratio) against fixed square inputs on digits of mixed aspect ratio.

  vit-jax sweep experiments/naflex.py --workdir /tmp/sweeps/naflex --parallel 2

The data: each of scikit-learn's 1,797 8x8 digits at a random place on a
black canvas of 1x1, 1x2, 2x1, 1x3 or 3x1 digit cells, upsampled 2x (16x16 to
16x48 or 48x16 px), as an image folder split like the bundled digits (every
fifth image is a test image: 1,437 train, 360 test). Loading this file writes
it once into `folder_path` (seconds). Fixed square input (`input.max_tokens=0`) is
the pipeline's usual one: Inception crops of the target's aspect ratio,
resized to 16x16 px, and at evaluation the central 16x16 after resizing the
short side; NaFlex (`input.max_tokens=16`) resizes each image, aspect ratio
kept, to at most 16 patches of 4x4 px (random crops keep the aspect ratio too)
and masks the padding. Both run the quickstart ViT on at most 16 patch tokens
for 400 steps, one seed each: 2 trials.
"""

import os
import tempfile

folder_path = os.path.join(tempfile.gettempdir(), 'vit_jax_digits_aspect')
canvas_shapes = ((1, 1), (1, 2), (2, 1), (1, 3), (3, 1))  # Canvas (rows, columns) in digit cells.


def write_folder(folder: str = folder_path) -> str:
  """Writes the mixed-aspect digits into `folder`/{train,test}/DIGIT/INDEX.png once; returns `folder`."""
  done = os.path.join(folder, 'complete')
  if os.path.exists(done):
    return folder
  import numpy as np
  from PIL import Image
  from sklearn.datasets import load_digits

  digits = load_digits()
  rng = np.random.default_rng(0)
  for index, (image, label) in enumerate(zip(digits.images, digits.target)):
    rows, columns = canvas_shapes[rng.integers(len(canvas_shapes))]
    canvas = np.zeros((8 * rows, 8 * columns), np.uint8)
    top, left = rng.integers(0, 8 * rows - 7), rng.integers(0, 8 * columns - 7)
    canvas[top:top + 8, left:left + 8] = np.round(image * 255 / 16).astype(np.uint8)
    canvas = canvas.repeat(2, axis=0).repeat(2, axis=1)
    split = 'test' if index % 5 == 0 else 'train'
    path = os.path.join(folder, split, str(label))
    os.makedirs(path, exist_ok=True)
    Image.fromarray(canvas).save(os.path.join(path, f'{index:04d}.png'))
  open(done, 'w').close()
  return folder


BASE_CONFIG = 'configs/quickstart.py'
OVERRIDES = {
    'dataset.name': 'image_folder',
    'dataset.folder': write_folder(),
    'total_steps': 400,
    'eval_every_steps': 100,
    'checkpoint_every_steps': 200,
    'log_every_steps': 50,
}
GRID = {'input.max_tokens': [0, 16]}
SEEDS = 1
METRIC = 'eval/accuracy'
MODE = 'max'
