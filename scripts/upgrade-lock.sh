#!/usr/bin/env bash
# Move the dependency lock on purpose: re-resolve the newest versions that pyproject.toml allows,
# run the test suite on them in a scratch environment, and replace requirements/ only if it passes.
# The library internals ftune relies on (ftune/internals/, docs/internals.md) are checked first, so a
# library that changed one is named in a line per internal instead of a page of failing tests.
#   scripts/upgrade-lock.sh              # upgrade, test, keep if green
#   scripts/upgrade-lock.sh --no-test    # only re-resolve (e.g. after adding a dependency), then run scripts/test.sh
# To move torch, edit requirements/torch.txt first. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
run_tests=1
if [ "${1:-}" = "--no-test" ]; then run_tests=0; shift; fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python=${PYTHON:-python3}

"$python" -m venv "$scratch/tools"
"$scratch/tools/bin/python" -m pip install --quiet --disable-pip-version-check packaging uv
"$scratch/tools/bin/python" scripts/lockfile.py compile --uv "$scratch/tools/bin/uv" --out "$scratch/requirements"
cp requirements/torch.txt requirements/*.in "$scratch/requirements/"
diff -u requirements/lock.txt "$scratch/requirements/lock.txt" | grep -E '^[-+][a-z]' || echo "lock.txt: no version changes"

if [ "$run_tests" = 1 ]; then
  # The candidate lock is tested in a copy of the tree, so a red suite leaves requirements/ untouched.
  git ls-files -z | tar --null -T - -cf - | (mkdir "$scratch/tree" && tar -xf - -C "$scratch/tree")
  cp "$scratch/requirements/"* "$scratch/tree/requirements/"
  # One process (the file takes seconds once test.sh has built the environment, which the suite then reuses). The
  # suite runs this file too, so on a failure it stops here.
  if ! (cd "$scratch/tree" && FTUNE_TEST_WORKERS=0 bash scripts/test.sh tests/unit/test_internals.py -q --tb=line); then
    echo "upgrade-lock: library internals ftune relies on no longer apply on the new versions (named above; the rows are" \
         "in ftune/internals/__init__.py); requirements/ is unchanged" >&2
    exit 1
  fi
  if ! (cd "$scratch/tree" && bash scripts/test.sh "$@"); then
    echo "upgrade-lock: the suite fails on the new versions; requirements/ is unchanged" >&2
    exit 1
  fi
fi
cp "$scratch/requirements/"*.txt requirements/
echo "upgrade-lock: requirements/ updated; commit it with the code it passed with"
