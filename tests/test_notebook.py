"""docs/quickstart.ipynb runs top to bottom, offline, with only the public API, so it cannot rot."""

import os
import re

import nbformat

from tests.conftest import TEST_XLA_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'docs', 'quickstart.ipynb')


def code(notebook) -> str:
  return '\n'.join(cell.source for cell in notebook.cells if cell.cell_type == 'code')


def test_the_notebook_is_committed_without_outputs_and_uses_only_the_public_api():
  import vit_jax
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  assert all(not cell.get('outputs') and not cell.get('execution_count')
             for cell in notebook.cells if cell.cell_type == 'code')
  source = code(notebook)
  imports = re.findall(r'^\s*(?:import|from)\s+(\S+)', source, re.M)
  assert [name for name in imports if name.startswith('vit_jax')] == ['vit_jax']
  assert set(re.findall(r'\bvit_jax\.(\w+)', source)) <= set(vit_jax.__all__)


def test_the_notebook_trains_predicts_and_shows_attention_maps_and_curves(data_dir, tmp_path):
  from nbclient import NotebookClient

  # The notebook's relative paths, as from docs/ in the checkout; its workdir lands in tmp_path.
  os.mkdir(tmp_path / 'docs')
  os.symlink(os.path.join(REPO, 'experiments'), tmp_path / 'experiments')
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  env = dict(os.environ, XLA_FLAGS=TEST_XLA_FLAGS)  # One CPU device, as for a user.
  # TensorFlow's thread pools (the input pipeline) one thread each: the same batches and results, and
  # on the suite's 2 busy cores about 6 of the kernel's 28 CPU-seconds fewer, spent waiting for work.
  env.update(TF_NUM_INTRAOP_THREADS='1', TF_NUM_INTEROP_THREADS='1')
  env.update(TFDS_DATA_DIR=data_dir, PYTHONPATH=REPO)
  client = NotebookClient(notebook, timeout=300, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path / 'docs')}})
  client.execute(env=env)  # Raises CellExecutionError, with the cell and its traceback, if a cell fails.

  outputs = [output for cell in notebook.cells if cell.cell_type == 'code' for output in cell.outputs]
  text = ''.join(output.get('text', '') for output in outputs)
  accuracy = float(re.search(r'eval accuracy: ([\d.]+)%', text).group(1))
  assert accuracy > 85  # Chance is 10%; the digits it shows are to be mostly right.
  shown = re.findall(r'_label(\d)\.png: (\d) \(', text)
  assert len(shown) == len(os.listdir(os.path.join(REPO, 'experiments', 'quickstart', 'samples')))
  assert sum(label == predicted for label, predicted in shown) >= len(shown) - 1, shown
  images = [output for output in outputs if 'image/png' in output.get('data', {})]
  assert len(images) == 2  # The attention maps and the training curves, inline.
  assert os.path.isfile(tmp_path / 'workdirs' / 'notebook' / 'curves.png')
