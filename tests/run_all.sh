#!/usr/bin/env bash
# The whole test suite: package in sync with the notebooks, every notebook's tests, then the integration tests.
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
nbdev_test --n_workers 2
python -m pytest -q tests
