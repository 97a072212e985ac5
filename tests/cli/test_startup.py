"""The CLI must start fast: importing it (and validating a recipe) loads no heavy ML library."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "datasets", "accelerate", "bitsandbytes", "gguf")


def loaded_heavy_modules(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint(' '.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return result.stdout.split()


def test_importing_the_cli_loads_no_heavy_library():
    assert loaded_heavy_modules("import ftune.cli") == []


def test_validate_loads_no_heavy_library(make_recipe):
    path = make_recipe()
    code = (
        "from typer.testing import CliRunner\nfrom ftune.cli import app\n"
        f"result = CliRunner().invoke(app, ['validate', {str(path)!r}])\nassert result.exit_code == 0, result.output"
    )
    assert loaded_heavy_modules(code) == []


def test_models_loads_no_heavy_library():
    code = "from typer.testing import CliRunner\nfrom ftune.cli import app\nassert CliRunner().invoke(app, ['models']).exit_code == 0"
    assert loaded_heavy_modules(code) == []
