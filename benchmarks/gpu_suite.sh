#!/usr/bin/env bash
# benchmarks/gpu_suite.py on the lent GPU machine (device tool), which starts bare and reaches no
# registry: it has python3 3.12 + torch, transformers, PyYAML... but no megatron-core. So:
#
#   here, once:  bash benchmarks/gpu_suite.sh --prepare
#                -> .gpu_carry/ (git-ignored, ~8 MB): the megatron-core cp312 wheel and the
#                   embedded books (the training data and needle haystacks)
#   there:       device run: command "bash benchmarks/gpu_suite.sh", carry [".gpu_carry"]
#                -> $OUT/gpu_suite.json, $OUT/gpu_suite.md, $OUT/gpu_suite.log
#
# The project itself is not installed there: the checkout travels and goes on PYTHONPATH.
# Extra arguments go to gpu_suite.py (e.g. --sections training --budget-s 200 for a rerun).
set -euo pipefail
cd "$(dirname "$0")/.."

CARRY=${GPU_SUITE_CARRY:-.gpu_carry}   # another folder only for checking this script elsewhere
MEGATRON_CORE=megatron-core==0.16.1   # the version the tests run (pyproject.toml, docker/Dockerfile)
TARGET_PYTHON=3.12                      # the GPU machine's python3 (DESIGN.md, the device's KINDS.md)

if [ "${1:-}" = --prepare ]; then
  PY=${PYTHON:-.venv/bin/python}
  [ -x "$PY" ] || PY=python3
  rm -rf "$CARRY.tmp"
  mkdir -p "$CARRY.tmp/wheels"
  # megatron-core ships per-Python wheels (a compiled dataset helper), so ask for the target's
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$CARRY.tmp/wheels" "$MEGATRON_CORE"
  books=$("$PY" -c 'from longrope2.data.books import default_cache_dir, load_books
load_books(progress=False)  # fetched once (network) if not cached yet
print(default_cache_dir())')
  cp -r "$books" "$CARRY.tmp/books"
  rm -rf "$CARRY"
  mv "$CARRY.tmp" "$CARRY"
  du -sh "$CARRY"
  echo "ready: device run with command 'bash benchmarks/gpu_suite.sh' and carry [\"$CARRY\"]"
  exit 0
fi

if ! compgen -G "$CARRY/wheels/*.whl" > /dev/null || [ ! -f "$CARRY/books/books.json" ]; then
  echo "error: $CARRY/ is missing or incomplete: run 'bash benchmarks/gpu_suite.sh --prepare' here and carry $CARRY" >&2
  exit 2
fi
PY=${PYTHON:-python3}
OUT=${OUT:-results/gpu_suite}
mkdir -p "$OUT"
SITE=/tmp/longrope2-site
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$CARRY"/wheels/*.whl
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export LONGROPE2_BOOKS_DIR="$PWD/$CARRY/books" PYTHONUNBUFFERED=1
# the suite stops itself at its budget (450 s); this is the backstop under the tool's 600 s limit
set -o pipefail
timeout -k 15 "${SUITE_TIMEOUT:-570}" "$PY" benchmarks/gpu_suite.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_suite.log"
