"""The package's shape: floors that import only downward, no cycles, stages side by side, a recipe that is a leaf,
chat templates shipped in the wheel, and errors that keep their cause.

Every module of ``ftune/`` sits on one floor of ``FLOORS``; an import may go to the same floor or below, never up,
and the module graph (function-level imports included) has no cycle. A new module must be given a floor here.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from functools import cache

import pytest

from ftune.errors import FtuneError
from tests.conftest import REPO

# Floor of each module, by its dotted name or the longest dotted prefix listed (a package names all its modules).
FLOORS = {
    # the recipe and what everything may read
    "ftune": 0, "ftune.errors": 0, "ftune.text_files": 0, "ftune.runtime": 0, "ftune.recipe": 0, "ftune.families": 0,
    "ftune.disk": 0, "ftune.checksums": 0, "ftune.redaction": 0,
    # facts about the run directory and the machine
    "ftune.run_dir": 1, "ftune.hardware": 1, "ftune.resources": 1,
    # mechanisms the stages share
    "ftune.model": 2, "ftune.methods": 2, "ftune.data": 2, "ftune.scoring": 2, "ftune.generation": 2, "ftune.metrics": 2,
    "ftune.parity": 2, "ftune.tuned": 2, "ftune.packed_attention": 2, "ftune.gguf": 2, "ftune.llamacpp": 2, "ftune.ollama": 2,
    "ftune.gguf_tokenizer": 2, "ftune.gguf_lora": 2,
    "ftune.internals": 2, "ftune.rewards": 2,
    # the stages, side by side
    "ftune.training": 3, "ftune.evaluate": 3, "ftune.merge": 3, "ftune.export": 3, "ftune.inference": 3,
    "ftune.benchmark": 3, "ftune.hub": 3, "ftune.model_card": 3,
    # task files lm-evaluation-harness loads by path (their loaders import nothing of ftune)
    "ftune.benchmarks": 0,
    # the command line
    "ftune.cli": 4, "ftune.__main__": 4,
}
STAGES = ("ftune.training", "ftune.evaluate", "ftune.merge", "ftune.export", "ftune.inference")
ALLOWED = {("ftune.export", "ftune.merge")}  # export merges first: what the user means by exporting an adapter run
RECIPE_MAY_IMPORT = {"ftune.errors", "ftune.text_files"}  # besides pydantic, yaml, the standard library and itself


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in (REPO / "ftune").rglob("*.py")}


def imported_names(tree: ast.Module) -> set[str]:
    """Dotted names a module imports anywhere, function bodies included; ``from pkg import sub`` names ``pkg.sub``."""
    known = modules()
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & known.keys()
            found.update(submodules or {node.module})
    return found


@cache
def graph() -> dict[str, set[str]]:
    """ftune module -> the ftune modules it imports."""
    known = modules()
    edges = {}
    for name, tree in known.items():
        targets = set()
        for imported in imported_names(tree):
            while imported and imported not in known:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        edges[name] = targets
    return edges


def floor(module: str) -> int:
    prefix = module
    while prefix not in FLOORS:
        assert "." in prefix, f"{module} has no floor in tests/unit/test_layout.py FLOORS; give it one"
        prefix = prefix.rpartition(".")[0]
    return FLOORS[prefix]


def stage_of(module: str) -> str | None:
    return next((stage for stage in STAGES if module == stage or module.startswith(stage + ".")), None)


def test_every_module_has_a_floor():
    for module in modules():
        floor(module)


def test_imports_only_go_down_or_across():
    upward = [f"{module} (floor {floor(module)}) imports {target} (floor {floor(target)})"
              for module, targets in graph().items() for target in sorted(targets) if floor(target) > floor(module)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    edges, index, low, stack, on_stack, cycles = graph(), {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("stage", STAGES)
def test_stages_stand_side_by_side(stage):
    crossing = {(stage, stage_of(target)) for module, targets in graph().items() if stage_of(module) == stage
                for target in targets if stage_of(target) not in (None, stage)}
    assert crossing <= ALLOWED, f"{stage} imports other stages: {sorted(crossing - ALLOWED)}"


def test_plan_and_probe_are_part_of_the_training_stage():
    assert {"ftune.training.plan", "ftune.training.probe", "ftune.training.run"} <= modules().keys()
    assert not (REPO / "ftune" / "train.py").exists()


def test_the_recipe_is_a_leaf():
    allowed_outside = {"pydantic", "pydantic_core", "yaml", "__future__", *sys.stdlib_module_names}
    for module, tree in modules().items():
        if not (module == "ftune.recipe" or module.startswith("ftune.recipe.")):
            continue
        for name in imported_names(tree):
            top = name.split(".")[0]
            if top == "ftune":
                assert name.startswith("ftune.recipe") or name in RECIPE_MAY_IMPORT, f"{module} imports {name}"
            else:
                assert top in allowed_outside, f"{module} imports {name}: the recipe reads pydantic and yaml only"


def test_every_recipe_stage_has_a_row_in_the_stage_table():
    from typing import get_args

    from ftune.recipe.stages import StageName
    from ftune.training.stages import STAGES as TABLE

    assert set(TABLE) == set(get_args(StageName))


def test_no_module_is_much_over_300_lines():
    long = {module_name(p): n for p in (REPO / "ftune").rglob("*.py") if (n := len(p.read_text(encoding="utf-8").splitlines())) > 320}
    assert not long, f"split these modules (over ~300 lines): {long}"


def test_only_the_cli_imports_the_cli():
    importers = {module for module, targets in graph().items() for target in targets if floor(target) == 4 and floor(module) < 4}
    assert not importers


def test_wheel_ships_the_chat_templates(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    [wheel] = tmp_path.glob("ftune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"ftune/chat_templates/chatml.jinja", "ftune/chat_templates/llama3.jinja", "ftune/chat_templates/alpaca.jinja"} <= set(names)
    assert "ftune/training/session.py" in names  # the training package is packaged, not only the root modules
    task = "ftune/benchmarks/ftune_dates/ftune_dates"  # the local benchmark task runs from an installed wheel too
    assert {f"{task}.yaml", f"{task}.jsonl", "ftune/benchmarks/ftune_dates/load.py"} <= set(names)


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
