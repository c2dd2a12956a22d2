#!/usr/bin/env bash
# CI, second environment: JAX's CUDA plugin (the [cuda12] extra) in .venv-cuda, where
# tests/cuda lower the bfloat16 B/16 train step for cuda with cuDNN attention. No GPU is
# needed: the plugin's cuDNN answers at trace time and nothing is compiled or run.
# About 2 minutes and 5.6 GB the first time; later runs reuse the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-cuda/bin/python ]; then
  python3 -m venv .venv-cuda
  .venv-cuda/bin/pip install --quiet --upgrade pip
fi
.venv-cuda/bin/pip install --quiet -r requirements.txt "jax[cuda12]==0.10.2"
JAX_PLATFORMS=cpu .venv-cuda/bin/python -m pytest -q -n 0 tests/cuda  # No GPU here: JAX on CPU, lowering for cuda.
