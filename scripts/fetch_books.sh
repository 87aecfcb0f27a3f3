#!/usr/bin/env bash
# Fetch (once) and list the public-domain books: six Austen novels (Debian r-cran-janeaustenr),
# Moby Dick (Debian r-cran-tokenizers), Botchan (PyPI sentencepiece sdist). Needs apt-get and
# dpkg-deb (Debian/Ubuntu) and pip; no R. Cached under $LONGROPE2_BOOKS_DIR or
# ~/.cache/longrope2/books. Extra args go to `python -m longrope2.data.books`
# (--cache-dir DIR, --refresh, --json).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" -m longrope2.data.books "$@"
