#!/usr/bin/env bash
# Create or reuse .venv with exactly the locked versions, check the lock, and run the test suite
# (offline, CPU). Extra arguments go to pytest, e.g. scripts/test.sh -m slow
# On a CPU with vector kernels wider than AVX2 (AVX512), the tests marked `numerical` (two code paths compared within
# a rounding tolerance, tests/tolerances.py) then run a second time on torch's AVX2 kernels (ATEN_CPU_CAPABILITY=avx2),
# which sum in another order: a tolerance that holds for one kernel width only fails here, not on the next machine.
# The script fails if either run does.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-env.sh
# The lock must agree with pyproject.toml, and .venv with the lock, before any test result means anything.
.venv/bin/python scripts/lockfile.py check
.venv/bin/python scripts/lockfile.py installed
export HF_HUB_OFFLINE=1
workers=(-n "${FTUNE_TEST_WORKERS:-2}")
status=0
.venv/bin/python -m pytest "${workers[@]}" "$@" || status=$?

capability=$(.venv/bin/python -c "import torch; print(torch.backends.cpu.get_cpu_capability())")
if [[ $capability == AVX512* ]]; then
    # The same arguments, with the caller's marker expression (pyproject's default when none) narrowed to `numerical`.
    selected="not slow and not gpu"
    others=()
    while (($#)); do
        case $1 in
            -m) selected=$2; shift 2 ;;
            -m*) selected=${1#-m}; shift ;;
            *) others+=("$1"); shift ;;
        esac
    done
    echo "CPU capability $capability: running the numerical tests again on torch's AVX2 kernels (ATEN_CPU_CAPABILITY=avx2), whose sums round in another order"
    rerun=0
    ATEN_CPU_CAPABILITY=avx2 .venv/bin/python -m pytest "${workers[@]}" ${others[@]+"${others[@]}"} -m "numerical and ($selected)" || rerun=$?
    # 5: no numerical test among those selected
    if ((rerun != 0 && rerun != 5)); then
        status=$rerun
    fi
fi
exit "$status"
