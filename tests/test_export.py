"""Export to the published .npz layout, and prediction from it: the same logits as the workdir."""

import json

import numpy as np
import pytest

from tests.trained_run import trained_run, trained_workdir
from vit_jax.tools import export
from vit_jax.data import pipeline
from vit_jax.checkpoint import run as run_lib
from vit_jax.tools import predict


@pytest.fixture
def images(tmp_path, tiny_config):
  """Three test-split digits as PNG files in a folder."""
  split = pipeline.open_split(tiny_config.dataset, 'test')
  folder = tmp_path / 'digits'
  folder.mkdir()
  for i in range(3):
    (folder / f'digit_{i}.png').write_bytes(split.source[i]['image'])
  return folder


def test_export_then_predict_gives_the_workdir_logits(tiny_config, images, tmp_path, capsys):
  workdir = trained_workdir(tiny_config)
  run = trained_run(tiny_config)
  written = export.export_run(run, str(tmp_path / 'export' / 'model.npz'))
  with np.load(written['npz']) as npz:
    keys = set(npz.files)
  assert {'embedding/kernel', 'cls', 'Transformer/posembed_input/pos_embedding', 'head/kernel',
          'Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel',
          'Transformer/encoder_norm/scale'} <= keys
  meta = json.loads(open(written['json']).read())
  assert meta['class_names'] == [str(d) for d in range(10)] and meta['step'] == run.step == 6
  assert meta['config']['model']['variant'] == 'tiny/4'

  exported = run_lib.load_exported(written['npz'])
  files = predict.find_images([str(images)])
  np.testing.assert_array_equal(predict.predict_logits(exported, files), predict.predict_logits(run, files))

  # The two routes of the command print the same report.
  predict.predict_main([str(images)], workdir=workdir, top_k_classes=3)
  from_workdir = capsys.readouterr().out
  predict.predict_main([str(images)], checkpoint=written['npz'], top_k_classes=3)
  assert capsys.readouterr().out == from_workdir != ''
