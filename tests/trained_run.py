"""One tiny run, trained a few steps once per test session, shared by the inference tests.

Training is the slow part of these tests (about ten seconds); predict, evaluate,
export and plots only read the workdir, so they can all share one.
"""

_CACHE: dict = {}


def trained_workdir(config) -> str:
  """The workdir of `config` (the conftest `tiny_config`) trained to its last step; trained once per
  run, by the first worker that asks (`conftest.built_once`). Tests read it and write elsewhere."""
  if 'workdir' not in _CACHE:
    from tests.conftest import built_once

    def train(workdir):
      from vit_jax.training import loop
      config.eval_every_steps = config.checkpoint_every_steps = config.total_steps  # Once, at the end.
      loop.train_and_evaluate(config, workdir)
    _CACHE['workdir'] = built_once('trained_run', train)
  return _CACHE['workdir']


def trained_run(config):
  """The `vit_jax.checkpoint.run.Run` of `trained_workdir`; loaded once."""
  if 'run' not in _CACHE:
    from vit_jax.checkpoint.run import load_workdir
    _CACHE['run'] = load_workdir(trained_workdir(config))
  return _CACHE['run']
