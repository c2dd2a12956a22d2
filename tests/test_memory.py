"""`vit-jax memory` says which of its figures hold for a GPU or TPU run: the train state's shards, exactly,
and activations only as the plan of the compiler it ran (on CPU, XLA:CPU's, which is not a GPU/TPU figure)."""

import json

from vit_jax.tools import memory


def test_the_report_says_whose_plan_the_activations_are(run_command):
  result = run_command('memory', '--config', 'configs/base.py', '--config.batch_size=16', '--json',
                       '--config.cpu_scheduler=concurrency')  # One plan: XLA:CPU's default.
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[1].startswith('Memory per device: params ') and 'activations ' in lines[1]
  assert lines[2] == 'params, optimizer (and ema): exact on any platform (the shards of the train state).'
  assert lines[3].startswith("activations: XLA:CPU's plan of the step compiled for these 8 device(s)")
  assert 'not a figure for a GPU or TPU' in lines[3]
  assert json.loads(lines[4])['activations_planned_by'] == 'XLA:CPU'


def test_simulated_devices_and_accelerator_plans_are_named_as_such():
  simulated = memory.what_the_figures_are('XLA:CPU', 64, simulated=True)
  assert "XLA:CPU's plan of the step compiled for 64 simulated CPU devices" in simulated
  assert 'not a figure for a GPU or TPU' in simulated
  assert memory.what_the_figures_are('XLA:GPU', 8, simulated=False).splitlines()[1] == (
      "activations: XLA:GPU's plan for these 8 device(s).")
