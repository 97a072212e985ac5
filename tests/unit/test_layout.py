"""The package's shape: stages side by side, chat templates shipped in the wheel, errors that keep their cause."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile

import pytest

from ftune.errors import FtuneError
from tests.conftest import REPO

STAGES = {"train", "evaluate", "merge", "export", "inference"}
ALLOWED = {("export", "merge")}  # export merges first: what the user means by exporting an adapter run


def ftune_imports(module: str) -> set[str]:
    """Top-level ftune modules that ``ftune/<module>.py`` imports anywhere, function bodies included."""
    tree = ast.parse((REPO / "ftune" / f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        found.update(name.split(".")[1] for name in names if name.startswith("ftune."))
    return found


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stages_stand_side_by_side(stage):
    others = (ftune_imports(stage) & STAGES) - {stage}
    assert {(stage, other) for other in others} <= ALLOWED, f"{stage} imports stage modules {others}"


def test_only_the_cli_imports_the_cli():
    assert not [p for p in (REPO / "ftune").rglob("*.py") if p.name not in ("cli.py", "__main__.py") and "ftune.cli" in p.read_text(encoding="utf-8")]


def test_wheel_ships_the_chat_templates(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    [wheel] = tmp_path.glob("ftune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"ftune/chat_templates/chatml.jinja", "ftune/chat_templates/llama3.jinja", "ftune/chat_templates/alpaca.jinja"} <= set(names)


def test_built_in_templates_are_found_as_package_data():
    from ftune.data.templates import read_chat_template
    from ftune.recipe.data import chat_template_names

    assert {"chatml", "llama3", "alpaca"} <= set(chat_template_names())
    assert "<|im_start|>" in read_chat_template("chatml")


def test_user_errors_keep_their_cause(tmp_path):
    from ftune.recipe import load_recipe

    broken = tmp_path / "recipe.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(FtuneError) as caught:
        load_recipe(broken)
    assert "not valid YAML" in str(caught.value) and caught.value.__cause__ is not None
