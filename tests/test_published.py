"""Published checkpoints by name, from a local mirror of the buckets: resolve, download, cache, fine-tune.

The mirror (a temporary directory standing for gs://vit_models through
VIT_JAX_CHECKPOINT_ROOT) holds the trained tiny run exported with `save_npz`
under published file names, and an augreg/index.csv in AugReg's columns.
"""

import csv
import json
import os
import threading
import time

import numpy as np
import pytest

from tests.trained_run import trained_workdir
from vit_jax.checkpoint import load_npz, published, save_npz
from vit_jax.checkpoint.npz import flatten_params, load_pretrained
from vit_jax.checkpoint.run import load_workdir
from vit_jax.errors import UsageError

AUGREG_COLUMNS = ['name', 'ds', 'epochs', 'lr', 'aug', 'wd', 'do', 'sd', 'best_val', 'final_val', 'final_test',
                  'adapt_ds', 'adapt_lr', 'adapt_steps', 'adapt_resolution', 'adapt_final_val',
                  'adapt_final_test', 'params', 'infer_samples_per_sec', 'filename', 'adapt_filename']
TI = 'Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0'
# (name, ds, final_val, filename, adapt_ds, adapt_resolution, adapt_final_val): the best i21k
# run of tiny/4 is 'light1' (0.61), though the i1k run has a higher final_val (another ds).
ROWS = [
    ('tiny/4', 'i21k', 0.52, 'tiny_4-i21k-300ep-aug_none', 'imagenet2012', 384, 0.70),
    ('tiny/4', 'i21k', 0.61, 'tiny_4-i21k-300ep-aug_light1', 'imagenet2012', 224, 0.71),
    ('tiny/4', 'i21k', 0.61, 'tiny_4-i21k-300ep-aug_light1', 'imagenet2012', 384, 0.74),
    ('tiny/4', 'i21k', 0.61, 'tiny_4-i21k-300ep-aug_light1', 'sklearn_digits', 16, 0.90),
    ('tiny/4', 'i1k', 0.90, 'tiny_4-i1k-300ep-aug_light1', 'imagenet2012', 384, 0.65),
    ('Ti/16', 'i21k', 0.40, TI, 'imagenet2012', 384, 0.78),
]


def adapt_filename(row):
  return f'{row[3]}--{row[4]}-steps_20k-lr_0.03-res_{row[5]}'


@pytest.fixture
def mirror(tiny_config, tmp_path, monkeypatch):
  """A local gs://vit_models (and gs://big_vision) holding the trained tiny run; a fresh cache."""
  run = load_workdir(trained_workdir(tiny_config))
  root = tmp_path / 'vit_models'
  files = ['imagenet21k/ViT-tiny', f'augreg/{TI}'] + [f'augreg/{r[3]}' for r in ROWS] + [
      f'augreg/{adapt_filename(r)}' for r in ROWS]
  for name in sorted(set(files)):
    save_npz(run.params, str(root / f'{name}.npz'))
  with open(root / 'augreg' / 'index.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, AUGREG_COLUMNS, restval='0')
    writer.writeheader()
    for row in ROWS:
      writer.writerow(dict(zip(['name', 'ds', 'final_val', 'filename', 'adapt_ds', 'adapt_resolution',
                                'adapt_final_val'], row), adapt_filename=adapt_filename(row)))
  big_vision = tmp_path / 'big_vision'
  save_npz(run.params, str(big_vision / 'vit_s16_i1k_300ep.npz'))
  monkeypatch.setenv(published.ROOT_ENV, str(root))
  monkeypatch.setenv(published.BIG_VISION_ROOT_ENV, str(big_vision))
  monkeypatch.setenv(published.CACHE_ENV, str(tmp_path / 'cache'))
  return root


@pytest.fixture
def copies(monkeypatch):
  """The URLs `published._copy` (the real one) downloads, in order."""
  urls, real = [], published._copy

  def counted(url, dest):
    urls.append(url)
    time.sleep(0.2)  # A slow network: concurrent callers arrive while the first one copies.
    return real(url, dest)
  monkeypatch.setattr(published, '_copy', counted)
  return urls


def test_names_resolve_to_files_under_the_roots(mirror, tmp_path):
  cache = tmp_path / 'cache'
  for name, relative in [('imagenet21k/ViT-B_16', 'imagenet21k/ViT-B_16.npz'),
                         ('imagenet21k+imagenet2012/ViT-B_16', 'imagenet21k+imagenet2012/ViT-B_16.npz'),
                         ('imagenet21k/R50+ViT-B_16', 'imagenet21k/R50+ViT-B_16.npz'),
                         (f'augreg/{TI}', f'augreg/{TI}.npz'), ('howto-i21k-Ti/16', f'augreg/{TI}.npz')]:
    resolved = published.resolve(name)
    assert resolved.path == str(mirror / relative) and resolved.key == ''
    assert resolved.cache_path == str(cache / 'vit_models' / relative)
  siglip = published.resolve('SigLIP B/16 224')
  assert siglip.path == str(tmp_path / 'big_vision/siglip/webli_en_b16_224_63724782.npz') and siglip.key == 'img'
  url = published.resolve('gs://big_vision/siglip/x.npz:img')
  assert (url.path, url.key, url.cache_path) == ('gs://big_vision/siglip/x.npz', 'img',
                                                 str(cache / 'urls/gs/big_vision/siglip/x.npz'))
  local = published.resolve(str(mirror / 'imagenet21k/ViT-tiny.npz'))
  assert local.cache_path is None and local.path == str(mirror / 'imagenet21k/ViT-tiny.npz')
  with pytest.raises(UsageError, match="'nowhere.npz' does not exist.*imagenet21k/ViT-B_16"):
    published.resolve('nowhere.npz')


def test_augreg_by_model_picks_the_best_final_val(mirror):
  assert published.pick_augreg('augreg:tiny/4') == 'tiny_4-i21k-300ep-aug_light1'
  assert published.pick_augreg('augreg:tiny/4@i1k') == 'tiny_4-i1k-300ep-aug_light1'
  assert published.pick_augreg('augreg:tiny/4->imagenet2012') == adapt_filename(ROWS[2])
  assert published.pick_augreg('augreg:tiny/4@i21k->imagenet2012@224') == adapt_filename(ROWS[1])
  assert published.pick_augreg('augreg:Ti/16') == TI
  assert published.resolve('augreg:tiny/4').path == str(mirror / 'augreg/tiny_4-i21k-300ep-aug_light1.npz')
  for spec, message in [('augreg:H/14', 'No AugReg model .H/14.*models: Ti/16, tiny/4'),
                        ('augreg:tiny/4@i21k_30', 'no pre-training on .i21k_30.*datasets: i1k, i21k'),
                        ('augreg:tiny/4->cifar10', 'fine-tuned on: imagenet2012, sklearn_digits'),
                        ('augreg:tiny/4->imagenet2012@512', 'at 512 px.*resolutions: 224, 384')]:
    with pytest.raises(UsageError, match=message):
      published.pick_augreg(spec)


def test_download_once_into_the_cache_even_from_several_threads(mirror, copies, tmp_path):
  name = 'imagenet21k/ViT-tiny'
  results = []
  threads = [threading.Thread(target=lambda: results.append(published.fetch(name))) for _ in range(4)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  cached = str(tmp_path / 'cache/vit_models/imagenet21k/ViT-tiny.npz')
  assert results == [(cached, '')] * 4
  assert copies == [str(mirror / 'imagenet21k/ViT-tiny.npz')]  # One download.
  assert open(cached, 'rb').read() == (mirror / 'imagenet21k/ViT-tiny.npz').read_bytes()
  assert sorted(os.listdir(os.path.dirname(cached))) == ['ViT-tiny.npz', 'ViT-tiny.npz.lock']  # No temp files.
  # The next use reads the cache, even with the mirror gone.
  os.rename(mirror, tmp_path / 'moved')
  assert published.fetch(name) == (cached, '') and len(copies) == 1


def test_a_short_download_is_not_cached(mirror, monkeypatch, tmp_path):
  real = published._copy

  def short(url, dest):  # The real copy, reported one byte short (a connection cut at the end).
    written, expected = real(url, dest)
    return written - 1, expected
  monkeypatch.setattr(published, '_copy', short)
  with pytest.raises(UsageError, match=r'stopped after \d+ of \d+ bytes; run again'):
    published.fetch('imagenet21k/ViT-tiny')
  assert os.listdir(tmp_path / 'cache/vit_models/imagenet21k') == ['ViT-tiny.npz.lock']


@pytest.mark.parametrize('root', ['empty_dir', 'https://127.0.0.1:9/vit_models'])
def test_an_unreachable_name_fails_in_one_line(root, tmp_path, monkeypatch, capsys):
  monkeypatch.setenv(published.ROOT_ENV, str(tmp_path / root) if root == 'empty_dir' else root)
  monkeypatch.setenv(published.CACHE_ENV, str(tmp_path / 'cache'))
  with pytest.raises(UsageError) as error:
    load_npz('imagenet21k/ViT-B_16')
  message = str(error.value)
  tried = os.path.join(str(tmp_path / root), 'imagenet21k/ViT-B_16.npz') if root == 'empty_dir' else (
      f'{root}/imagenet21k/ViT-B_16.npz')
  assert '\n' not in message and f'tried {tried} (' in message
  assert f"put the file at {tmp_path / 'cache/vit_models/imagenet21k/ViT-B_16.npz'}" in message
  assert capsys.readouterr().err == ''  # Nothing but the error.
  assert message.endswith('(or set VIT_JAX_CHECKPOINT_ROOT to a directory holding imagenet21k/ViT-B_16.npz).')


def test_sub_tree_of_a_two_tower_file(mirror, tmp_path):
  one = flatten_params(load_npz('imagenet21k/ViT-tiny'))
  towers = {f'params/img/{k}': v for k, v in one.items()}
  towers['params/txt/Embed_0/embedding'] = np.zeros((3, 4), np.float32)
  np.savez(tmp_path / 'two_tower.npz', **towers)
  img = flatten_params(load_npz(f'{tmp_path}/two_tower.npz:img'))
  assert sorted(img) == sorted(one)
  for key in one:
    np.testing.assert_array_equal(img[key], one[key])
  with pytest.raises(UsageError, match="no sub-tree 'image'; its top-level keys are img, txt"):
    load_npz(f'{tmp_path}/two_tower.npz:image')


def test_finetune_from_a_published_name(mirror, copies, tiny_config, tmp_path, capsys):
  from vit_jax.training import loop
  tiny_config.init.path = 'augreg:tiny/4'
  tiny_config.total_steps, tiny_config.eval_every_steps, tiny_config.checkpoint_every_steps = 2, 2, 2
  tiny_config.optimizer.name, tiny_config.optimizer.learning_rate = 'sgd', 0.0  # Keeps what was loaded.
  tiny_config.optimizer.weight_decay = 0.0
  loop.train_and_evaluate(tiny_config, str(tmp_path / 'run'))
  assert 'Initialised from augreg:tiny/4' in capsys.readouterr().out
  assert copies == [str(mirror / 'augreg/index.csv'), str(mirror / 'augreg/tiny_4-i21k-300ep-aug_light1.npz')]
  tuned = flatten_params(load_pretrained(str(tmp_path / 'run')))
  source = flatten_params(load_npz(str(mirror / 'augreg/tiny_4-i21k-300ep-aug_light1.npz')))
  for key, value in source.items():
    expected = np.zeros_like(value) if key.startswith('head/') else value  # reset_head zeroes the head.
    np.testing.assert_array_equal(tuned[key], expected, err_msg=key)


def test_evaluate_a_published_checkpoint_with_only_a_config_file(mirror, tiny_config, tmp_path):
  from vit_jax.checkpoint.run import run_from_flags
  from vit_jax.tools import evaluate
  config_file = tmp_path / 'eval_config.py'
  config_file.write_text(
      'from configs import quickstart\n\n\ndef get_config():\n  config = quickstart.get_config()\n'
      f'  config.dataset.data_dir = {tiny_config.dataset.data_dir!r}\n  config.model.variant = "tiny/4"\n'
      '  for key in ("hidden_size", "num_layers", "mlp_dim", "num_heads"):\n    config.model[key] = None\n'
      '  config.eval_batch_size = 64\n  return config\n')
  run = run_from_flags(None, 'imagenet21k/ViT-tiny', str(config_file))
  assert run.class_names == [str(d) for d in range(10)] and run.step is None
  report = evaluate.evaluate_run(run, str(tmp_path / 'eval'), num_confused=2)
  # The same parameters as the trained run: the same accuracy on the same split.
  reference = evaluate.evaluate_run(load_workdir(trained_workdir(tiny_config)), str(tmp_path / 'ref'), 2)
  assert report['num_examples'] == 360 and report['accuracy'] == reference['accuracy']
  assert json.loads((tmp_path / 'eval/report.json').read_text())['accuracy'] == report['accuracy']
  with pytest.raises(UsageError, match='No config for .imagenet21k/ViT-tiny.*pass --config'):
    run_from_flags(None, 'imagenet21k/ViT-tiny', None)
