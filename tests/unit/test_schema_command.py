"""``ftune schema``: a valid JSON Schema of the recipe that accepts every shipped recipe (shorthands included), refuses
unknown keys, carries the reference's descriptions, and is the committed docs/recipe.schema.json the recipes point to."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from ftune.cli import app
from ftune.recipe import METHOD_CLASSES, Recipe, load_recipe
from ftune.recipe.json_schema import MODELINE, SHORTHANDS, recipe_json_schema, render_schema
from tests.conftest import REPO, invoke_ok

COMMITTED = REPO / "docs" / "recipe.schema.json"
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(invoke_ok("schema").output)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def problems(validator, recipe: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(recipe)]


def models(root: type[BaseModel] = Recipe, seen: set | None = None) -> set[type[BaseModel]]:
    """Every section model a recipe is made of, methods included."""
    seen = set() if seen is None else seen
    seen.add(root)
    for field in root.model_fields.values():
        for inner in _models_in(field.annotation):
            if inner not in seen:
                models(inner, seen)
    return seen


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def test_schema_covers_every_section_with_the_references_descriptions(validator):
    schema = validator.schema
    assert schema["$schema"].endswith("2020-12/schema") and set(schema["properties"]) == set(Recipe.model_fields)
    assert set(schema["required"]) == {"data", "method", "output_dir"}
    assert set(models()) >= set(METHOD_CLASSES)
    for model in models():
        node = schema if model is Recipe else schema["$defs"][model.__name__]
        node = node.get("anyOf", [node])[0]  # a model with a shorthand keeps its declared form first
        assert node.get("additionalProperties") is False, model.__name__
        for name, field in model.model_fields.items():
            if field.description:
                assert node["properties"][name]["description"] == field.description, f"{model.__name__}.{name}"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_shipped_recipe_validates_and_points_at_the_committed_schema(validator, path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith(MODELINE), f"{path}: the first line should be {MODELINE}<path to docs/recipe.schema.json>"
    assert (path.parent / first.removeprefix(MODELINE)).resolve() == COMMITTED
    assert problems(validator, yaml.safe_load(path.read_text(encoding="utf-8"))) == []


def test_unknown_keys_are_refused_in_sections_and_in_methods(validator):
    recipe = yaml.safe_load((REPO / "recipes" / "smollm2-135m" / "lora-quickstart.yaml").read_text())
    recipe["training"]["learning_rat"] = 1e-3
    assert any("learning_rat" in p and "training" in p for p in problems(validator, recipe))
    del recipe["training"]["learning_rat"]
    recipe["method"]["rank"] = 8  # lora's key is r
    assert problems(validator, recipe)
    recipe["method"] = {"name": "lora", "r": 8}
    recipe["trainig"] = {}
    assert any("trainig" in p for p in problems(validator, recipe))


@pytest.mark.parametrize("section", [
    {"data": {"train": "DATA", "eval": ["DATA", {"path": "DATA", "format": "alpaca"}]}},
    {"data": {"train": {"path": "DATA"}}},
    {"training": {"mixed_precision": False}},  # YAML 1.1 reads an unquoted no as false
    {"tracking": {"report_to": "tensorboard"}},
    {"tracking": {"report_to": "none"}},
    {"tracking": {"report_to": None}},
    {"preference": {"precompute_reference": "no"}},
])
def test_shorthands_ftune_accepts_are_valid_in_the_schema(validator, make_recipe, alpaca_files, section):
    train = str(alpaca_files[0])
    section = json.loads(json.dumps(section).replace('"DATA"', json.dumps(train)))
    path = make_recipe(**section)
    load_recipe(path)  # ftune takes it
    assert problems(validator, yaml.safe_load(path.read_text())) == []


def test_every_validator_that_reads_a_value_first_has_its_shorthand_listed():
    """A new ``mode="before"`` validator must say in SHORTHANDS which other forms it accepts (or none)."""
    listed = set(SHORTHANDS)
    for model in models():
        decorators = model.__pydantic_decorators__
        for validator in decorators.field_validators.values():
            if validator.info.mode == "before":
                for field in validator.info.fields:
                    assert (model, field) in listed, f"{model.__name__}.{field}: add its shorthand forms to json_schema.SHORTHANDS"
        if any(v.info.mode == "before" for v in decorators.model_validators.values()):
            assert (model, None) in listed, f"{model.__name__}: add its shorthand forms to json_schema.SHORTHANDS"


def test_output_file_is_the_printed_schema_and_the_committed_one_is_current(tmp_path):
    invoke_ok("schema", "--output", tmp_path / "recipe.schema.json")
    assert (tmp_path / "recipe.schema.json").read_text() == render_schema() == invoke_ok("schema").output
    assert COMMITTED.read_text() == render_schema(), "regenerate with: ftune schema -o docs/recipe.schema.json"
    assert recipe_json_schema()["title"] == "ftune recipe"


def test_an_output_that_is_a_directory_is_one_line_and_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["schema", "-o", str(tmp_path)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "is a directory" in result.output
    assert list(Path(tmp_path).iterdir()) == []
