"""`vit-jax analyze` (the paper's Figure 7), each part against an independent computation."""

import itertools
import json
import os

import numpy as np
import pytest

from tests.trained_run import trained_workdir
from vit_jax.checkpoint.run import load_workdir
from vit_jax.errors import UsageError
from vit_jax.models.layers import sincos_2d_posemb
from vit_jax.tools import analyze


def brute_force_mean_distance(grid, shape):
  """Mean distance in pixels over all ordered pairs of patch centres, itself included, by loops."""
  rows, columns = grid
  height, width = shape[0] / rows, shape[1] / columns
  centres = [((i + 0.5) * height, (j + 0.5) * width) for i in range(rows) for j in range(columns)]
  total = sum(np.hypot(a[0] - b[0], a[1] - b[1]) for a, b in itertools.product(centres, centres))
  return total / len(centres) ** 2


@pytest.mark.parametrize('grid, shape, prefix', [((4, 4), (16, 16), 1), ((14, 14), (224, 224), 1),
                                                 ((3, 5), (12, 40), 3), ((2, 3), (32, 48), 0)])
def test_uniform_attention_gives_mean_pairwise_patch_distance(grid, shape, prefix):
  tokens = prefix + grid[0] * grid[1]
  attention = [np.full((2, 3, tokens, tokens), 1 / tokens, np.float32)] * 2  # Two layers, three heads.
  distance = analyze.mean_attention_distance(attention, grid, shape)
  assert distance.shape == (2, 3)
  np.testing.assert_allclose(distance, brute_force_mean_distance(grid, shape), rtol=1e-5)


def test_attention_to_itself_gives_zero_and_prefix_tokens_are_dropped():
  grid, shape, prefix = (4, 6), (16, 24), 2  # Class token and one register.
  tokens = prefix + 24
  rng = np.random.default_rng(0)
  # Half of each patch query's weight on the prefix tokens, the rest on itself.
  attention = np.zeros((3, 2, tokens, tokens), np.float32)
  attention[:, :, :, :prefix] = rng.dirichlet(np.ones(prefix), size=(3, 2, tokens)) * 0.5
  attention[:, :, np.arange(tokens), np.arange(tokens)] += 0.5
  attention[:, :, :prefix] = rng.dirichlet(np.ones(tokens), size=(3, 2, prefix))  # Prefix queries: anything.
  np.testing.assert_allclose(analyze.mean_attention_distance([attention], grid, shape), 0, atol=1e-6)


def test_neighbour_attention_measures_rows_and_columns_in_their_own_pixels():
  # A 2x3 grid of 16-pixel-tall, 8-pixel-wide tokens (a non-square input of 32x24 pixels).
  grid, shape = (2, 3), (32, 24)
  index = np.arange(6).reshape(grid)
  down = np.zeros((1, 1, 6, 6), np.float32)
  down[0, 0, index.reshape(-1), np.roll(index, -1, axis=0).reshape(-1)] = 1  # Row below (wrapping).
  right = np.zeros((1, 1, 6, 6), np.float32)
  right[0, 0, index.reshape(-1), np.roll(index, -1, axis=1).reshape(-1)] = 1  # Column right (wrapping).
  assert analyze.mean_attention_distance([down], grid, shape)[0, 0] == pytest.approx(16)
  # Two of three columns step 8 pixels right, the last wraps 16 pixels left.
  assert analyze.mean_attention_distance([right], grid, shape)[0, 0] == pytest.approx((8 + 8 + 16) / 3)


def test_sincos_embeddings_are_most_similar_at_their_own_position():
  grid = (5, 7)
  similarity = analyze.position_similarity(sincos_2d_posemb(*grid, 64)[0], grid)
  assert similarity.shape == (5, 7, 5, 7)
  for i, j in itertools.product(range(5), range(7)):
    assert np.unravel_index(similarity[i, j].argmax(), grid) == (i, j)
    assert similarity[i, j, i, j] == pytest.approx(1.0)
    assert (np.delete(similarity[i, j].reshape(-1), i * 7 + j) < 1 - 1e-3).all()
  np.testing.assert_allclose(similarity, similarity.transpose(2, 3, 0, 1), atol=1e-12)


def test_learned_posemb_drops_the_class_entry_and_keeps_row_major_order():
  grid, dim = (2, 3), 8
  posemb = np.random.default_rng(1).normal(size=(1, 1 + 6, dim))
  params = {'Transformer': {'posembed_input': {'pos_embedding': posemb}}}
  embeddings, kind = analyze.patch_position_embeddings(params, None, grid)
  assert kind == 'learned'
  np.testing.assert_array_equal(embeddings, posemb[0, 1:])
  similarity = analyze.position_similarity(embeddings, grid)
  unit = posemb[0, 1:] / np.linalg.norm(posemb[0, 1:], axis=1, keepdims=True)
  assert similarity[1, 0, 0, 2] == pytest.approx(unit[3] @ unit[2])  # Patch (1, 0) is token 1 + 3.


def test_filter_components_match_numpy_svd_up_to_sign():
  rng = np.random.default_rng(0)
  # Filters with a few strong directions, so that the components are well separated.
  basis = rng.normal(size=(48, 48)) * np.geomspace(10, 0.1, 48)
  kernel = (rng.normal(size=(96, 48)) @ basis.T + 3.0).T.reshape(4, 4, 3, 96)
  components, ratios = analyze.filter_components(kernel, 28)
  assert components.shape == (28, 4, 4, 3)

  filters = kernel.transpose(3, 0, 1, 2).reshape(96, 48)  # One filter (ph, pw, rgb) per row.
  _, singular, vt = np.linalg.svd(filters - filters.mean(axis=0), full_matrices=False)
  flat = components.reshape(28, 48)
  np.testing.assert_allclose(np.abs(np.sum(flat * vt[:28], axis=1)), 1, atol=1e-8)
  np.testing.assert_allclose(ratios, singular[:28] ** 2 / (singular ** 2).sum(), rtol=1e-8)
  # At most rank-many components: 5 filters in 48 dimensions.
  assert analyze.filter_components(kernel[..., :5], 28)[0].shape[0] == 5


def test_hybrid_and_non_rgb_stems_have_no_pixel_filters():
  kernel = np.zeros((1, 1, 1024, 768))
  for params in ({'ResNet': {}, 'embedding': {'kernel': kernel}}, {'conv_root': {}, 'embedding': {}},
                 {'embedding': {'kernel': kernel}}):
    found, why = analyze.pixel_filters(params)
    assert found is None and 'not applicable' in why
  assert 'hybrids' in analyze.pixel_filters({'ResNet': {}})[1]


def test_analyze_on_the_trained_run_matches_predicts_attention(tiny_config, tmp_path):
  from vit_jax.data import pipeline
  from vit_jax.tools import predict

  run = load_workdir(trained_workdir(tiny_config))
  # Five test digits as PNG files: the folder path goes through predict's preprocessing.
  split = pipeline.open_split(run.config.dataset, 'test')
  folder = tmp_path / 'digits'
  folder.mkdir()
  for i in range(5):
    (folder / f'{i}.png').write_bytes(split.source[i]['image'])
  out = tmp_path / 'analysis'
  result = analyze.analyze(run, str(out), images_dir=str(folder), batch_size=4)

  files = predict.find_images([str(folder)])
  attention = [np.concatenate(layer) for layer in zip(*(
      a['attention'] for *_, a in predict.predict_batches(run, files, return_attention=True)))]
  assert attention[0].shape == (5, 2, 17, 17)  # Class token + a 4x4 grid of 4x4-pixel patches.
  # Independently: drop the class token, renormalise, weight the centre distances.
  y, x = np.divmod(np.arange(16), 4)
  centres = np.stack([y, x], 1) * 4 + 2.0
  distances = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
  expected = []
  for a in attention:
    patches = a[:, :, 1:, 1:] / a[:, :, 1:, 1:].sum(-1, keepdims=True)
    expected.append((patches * distances).sum(-1).mean(axis=(0, 2)))
  np.testing.assert_allclose(result['distance'], expected, rtol=1e-4)

  report = json.loads((out / 'attention_distance.json').read_text())
  assert report['num_images'] == 5 and report['token_grid'] == [4, 4] and report['pixels_per_token'] == [4, 4]
  np.testing.assert_allclose(report['mean_attention_distance'], expected, rtol=1e-4)
  assert [row['layer'] for row in report['layers']] == [1, 2]
  assert report['uniform_attention_distance'] == pytest.approx(brute_force_mean_distance((4, 4), (16, 16)))
  for name in ('embedding_filters.png', 'position_similarity.png', 'attention_distance.png'):
    assert (out / name).read_bytes()[:4] == b'\x89PNG'
  assert '28 principal components of 32 4x4 filters' in result['filters']


def test_command_writes_the_figures_for_a_workdir(tiny_config, tmp_path, run_command):
  workdir = trained_workdir(tiny_config)
  out = tmp_path / 'figure7'
  result = run_command('analyze', '--workdir', workdir, '--out', str(out), '--num_images', '6',
                       '--batch_size', '4')
  assert result.returncode == 0, result.stderr
  assert sorted(os.listdir(out)) == ['attention_distance.json', 'attention_distance.png',
                                     'embedding_filters.png', 'position_similarity.png']
  report = json.loads((out / 'attention_distance.json').read_text())
  assert report['num_images'] == 6 and report['images'] == '6 images of sklearn_digits test'
  distance = np.asarray(report['mean_attention_distance'])
  assert distance.shape == (2, 2) and (distance > 0).all() and (distance < report['max_patch_distance']).all()
  assert 'layer 2:' in result.stdout and 'embedding filters:' in result.stdout


def test_bad_options_fail_before_anything_is_loaded(tmp_path):
  with pytest.raises(UsageError, match='--num_images=0 must be a positive integer'):
    analyze.check_options(None, 0, None, 32, 28)
  with pytest.raises(UsageError, match='both name the images'):
    analyze.check_options(str(tmp_path), 8, 'test', 32, 28)
  with pytest.raises(UsageError, match='is not a folder'):
    analyze.check_options(str(tmp_path / 'missing'), 8, None, 32, 28)


def test_distances_on_the_device_for_registers_scan_and_a_non_square_input():
  import jax

  from vit_jax.checkpoint.run import Run
  from vit_jax.models import create_model

  model = create_model('tiny/4', 10, pool='gap', num_registers=2, scan=True)
  images = np.random.default_rng(0).normal(size=(3, 8, 12, 3)).astype(np.float32)
  params = jax.jit(model.init)(jax.random.key(0), images[:1])['params']
  grid = analyze.token_grid(model, params, (8, 12))
  assert grid == (2, 3)
  _, out = model.apply({'params': params}, images, return_attention=True)
  assert np.shape(out['attention'][0]) == (3, 2, 2 + 6, 2 + 6)  # Registers first, then the patches.
  run = Run(None, model, params, [], None)
  distance, count = analyze.attention_distances(run, iter([images[:2], images[2:]]), grid, (8, 12), batch_size=2)
  assert count == 3
  np.testing.assert_allclose(distance, analyze.mean_attention_distance(out['attention'], grid, (8, 12)),
                             rtol=1e-5)


def test_a_non_square_hybrid_gets_positions_and_distances_but_no_filters(tiny_config, tmp_path):
  import jax

  from vit_jax.checkpoint.run import Run
  from vit_jax.models import model_from_config

  tiny_config.model.variant = 'Rtiny+tiny/8'  # ResNet stride 8, 1x1 patches.
  tiny_config.input.image_size = (16, 32)
  model = model_from_config(tiny_config)
  params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 16, 32, 3), np.float32))['params']
  assert 'conv_root' in params
  run = Run(tiny_config, model, params, [str(i) for i in range(10)], None)
  result = analyze.analyze(run, str(tmp_path), num_images=3, batch_size=2)
  assert 'hybrids' in result['filters'] and 'filters' not in result['paths']
  assert not (tmp_path / 'embedding_filters.png').exists()
  assert (tmp_path / 'position_similarity.png').exists() and result['positions'] == 'learned, 2x4 patch grid'
  report = result['report']
  assert report['token_grid'] == [2, 4] and report['pixels_per_token'] == [8, 8] and report['num_images'] == 3
  assert report['uniform_attention_distance'] == pytest.approx(brute_force_mean_distance((2, 4), (16, 32)))
  assert result['distance'].shape == (2, 2) and (result['distance'] > 0).all()
