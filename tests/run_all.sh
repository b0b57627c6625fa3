#!/usr/bin/env bash
# The whole test suite: package in sync with the notebooks, then every notebook and the integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
if git rev-parse --git-dir >/dev/null 2>&1; then
  nbdev_export
  if [ -n "$(git status --porcelain -- minddiffuser)" ]; then
    echo "nbdev_export changed minddiffuser/: the package is out of date with the notebooks. Run nbdev_export and commit." >&2
    git status --porcelain -- minddiffuser >&2
    exit 1
  fi
fi
# Every notebook's cells run inside the pytest suite, whole and under papermill: the chain's chapters (00-06) in the
# demo chain (tests/conftest.py), the others in tests/test_notebook_outputs.py through tools/notebook_outputs.py.
# That covers every cell `nbdev_test` would run (it skips the `slow` ones besides), so it is not run again here;
# `nbdev_test --n_workers 2` remains the quick check of the lessons while editing a notebook.
python -m pytest -q --durations=15 tests
