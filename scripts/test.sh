#!/usr/bin/env bash
# The test suite on CPU: `bash scripts/test.sh` (extra args go to pytest, e.g. `-m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -q "$@"
