"""tests/cuda runs only in the environment with JAX's CUDA plugin (.ci/cuda_env.sh builds it).

Without the plugin (the main environment) pytest does not collect these files;
with it, they run and never skip.
"""

import importlib.util


def cuda_plugin_installed() -> bool:
  return (importlib.util.find_spec('jax_plugins') is not None
          and importlib.util.find_spec('jax_plugins.xla_cuda12') is not None)


collect_ignore_glob = [] if cuda_plugin_installed() else ['test_*.py']
