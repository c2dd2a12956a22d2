"""`vit-jax summary`: parameters per module, total, GFLOPs, and the last line."""


import pytest

from vit_jax.tools import summary


def test_cli_prints_modules_and_ends_with_total(tmp_path, run_command):
  result = run_command('summary', 'tiny/4', '--num_classes', '10', '--image_size', '16', '--pool', 'map')
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert lines[-1] == 'total_params: 28074'
  names = [line.split()[0] for line in lines[2:-2]]
  assert names == ['embedding', 'Transformer/posembed_input', 'Transformer/encoderblock_{0..1}',
                   'Transformer/encoder_norm', 'MAPHead_0', 'head', 'total']
  assert any(line.startswith('GFLOPs per image: ') for line in lines)


@pytest.mark.parametrize('variant,params,gflops', [
    # timm reports 17.56 / 4.41 GMACs at 224 px; XLA counts 2 FLOPs per MAC plus the
    # element-wise work, which the MAC counts leave out.
    ('B/16', 86_567_656, (35.1, 36.0)),
    ('B/32', 88_224_232, (8.8, 9.0)),
])
def test_published_counts_and_flops(variant, params, gflops):
  text = summary.summarize(variant)
  assert text.splitlines()[-1] == f'total_params: {params}'
  assert 'Transformer/encoderblock_{0..11}' in text
  value = float(text.split('GFLOPs per image: ')[1].split()[0])
  assert gflops[0] <= value <= gflops[1]


def test_bad_image_size_is_one_line_error(capsys):
  assert summary.main(['B/16', '--image_size', '100']) == 2
  assert 'not divisible by the patch size 16' in capsys.readouterr().err
