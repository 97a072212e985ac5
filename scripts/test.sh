#!/usr/bin/env bash
# Create or reuse .venv, install ftune with its test extras, and run the test suite (offline, CPU).
# Extra arguments go to pytest, e.g. scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-env.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -n "${FTUNE_TEST_WORKERS:-2}" "$@"
