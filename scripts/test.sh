#!/usr/bin/env bash
# Create or reuse .venv with exactly the locked versions, check the lock, and run the test suite
# (offline, CPU). Extra arguments go to pytest, e.g. scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-env.sh
# The lock must agree with pyproject.toml, and .venv with the lock, before any test result means anything.
.venv/bin/python scripts/lockfile.py check
.venv/bin/python scripts/lockfile.py installed
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -n "${FTUNE_TEST_WORKERS:-2}" "$@"
