#!/usr/bin/env bash
# Fine-tune the built-in SmolLM2-135M-Instruct on the shipped date-normalisation data, then score the
# tuned model beside the base model. Idempotent: reuses .venv and the imported model on later runs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-env.sh

recipe=recipes/smollm2-135m/lora-quickstart.yaml
run_dir=$(.venv/bin/ftune validate -q "$recipe" && .venv/bin/python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['output_dir'])" "$recipe")
.venv/bin/ftune train "$recipe" --overwrite
.venv/bin/ftune eval "$run_dir" --base
echo "Quickstart run directory: $(cd "$run_dir" && pwd)"
