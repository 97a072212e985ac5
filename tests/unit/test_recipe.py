"""Recipe schema and error messages: every mistake names its key, its line, and how to fix it."""

from __future__ import annotations

import pytest
import yaml

from ftune.errors import FtuneError
from ftune.recipe import load_recipe


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n')
    return path


def write(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def base_text(data_file, extra: str = "", method: str = "  name: lora\n") -> str:
    return f"data:\n  train: {data_file}\nmethod:\n{method}output_dir: out\n{extra}"


def errors_of(path, overrides=()) -> list[str]:
    with pytest.raises(FtuneError) as info:
        load_recipe(path, overrides)
    return info.value.problems


def test_minimal_recipe_fills_defaults(tmp_path, data_file):
    recipe = load_recipe(write(tmp_path, base_text(data_file)))
    assert recipe.method.name == "lora" and recipe.method.r == 16
    assert recipe.model.name_or_path == "smollm2-135m-instruct"
    assert recipe.data.train[0].path == str(data_file.resolve())
    assert recipe.training.learning_rate == 2e-4


def test_misspelled_key_names_path_line_and_suggestion(tmp_path, data_file):
    text = base_text(data_file, "training:\n  learning_rat: 0.001\n")
    [problem] = errors_of(write(tmp_path, text))
    assert "training.learning_rat (line 7)" in problem
    assert "Did you mean 'learning_rate'?" in problem


def test_misspelled_method_key_suggests_within_the_method(tmp_path, data_file):
    [problem] = errors_of(write(tmp_path, base_text(data_file, method="  name: lora\n  lora_alpha: 8\n")))
    assert "method.lora_alpha (line 5)" in problem and "Did you mean 'alpha'?" in problem


def test_unknown_method_lists_choices(tmp_path, data_file):
    [problem] = errors_of(write(tmp_path, base_text(data_file, method="  name: lorra\n")))
    assert "unknown method 'lorra'" in problem and "Did you mean 'lora'?" in problem


def test_bad_choice_and_wrong_type_are_separate_lines(tmp_path, data_file):
    text = base_text(data_file, "model:\n  dtype: float33\ntraining:\n  batch_size: many\n")
    problems = errors_of(write(tmp_path, text))
    assert len(problems) == 2
    assert any("model.dtype (line 7)" in p and "Did you mean 'float32'?" in p for p in problems)
    assert any("training.batch_size (line 9)" in p and "'many'" in p for p in problems)


def test_out_of_range_value(tmp_path, data_file):
    [problem] = errors_of(write(tmp_path, base_text(data_file, method="  name: lora\n  r: 0\n")))
    assert "method.r (line 5)" in problem and "greater than 0" in problem


def test_missing_required_section(tmp_path, data_file):
    problems = errors_of(write(tmp_path, f"data:\n  train: {data_file}\noutput_dir: out\n"))
    assert any(p.endswith("method: required key is missing") for p in problems)


def test_missing_data_file_is_an_error_naming_the_entry(tmp_path, data_file):
    [problem] = errors_of(write(tmp_path, base_text(data_file).replace(str(data_file), "nope.jsonl")))
    assert "data.train.0.path (line 2)" in problem and "does not exist" in problem


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path, data_file):
    path = write(tmp_path, base_text(data_file))
    recipe = load_recipe(path, ["training.learning_rate=1e-4", "method.target_modules=[q_proj, v_proj]"])
    assert recipe.training.learning_rate == 1e-4
    assert recipe.method.target_modules == ["q_proj", "v_proj"]
    [problem] = errors_of(path, ["training.epochs=-1"])
    assert "training.epochs (--set)" in problem


def test_override_without_equals_sign(tmp_path, data_file):
    [problem] = errors_of(write(tmp_path, base_text(data_file)), ["training.learning_rate"])
    assert "expected KEY=VALUE" in problem


def test_full_finetuning_of_quantized_base_is_rejected_with_reason(tmp_path, data_file):
    text = base_text(data_file, "quantization:\n  bits: 4\n", method="  name: full\n")
    [problem] = errors_of(write(tmp_path, text))
    assert "cannot train a 4-bit quantized base" in problem and "method: lora" in problem


def test_four_bit_options_with_eight_bits(tmp_path, data_file):
    [problem] = errors_of(write(tmp_path, base_text(data_file, "quantization:\n  bits: 8\n  quant_type: fp4\n")))
    assert "quantization (line 6)" in problem and "only apply to bits: 4" in problem


def test_invalid_yaml_reports_line(tmp_path):
    [problem] = errors_of(write(tmp_path, "data:\n  train: [a\nmethod: x\n"))
    assert "not valid YAML" in problem and "line" in problem


def test_resolved_recipe_round_trips(tmp_path, data_file):
    from ftune.recipe import validate_recipe

    recipe = load_recipe(write(tmp_path, base_text(data_file)))
    again = validate_recipe(yaml.safe_load(yaml.safe_dump(recipe.model_dump(mode="json"))))
    assert again == recipe


def test_every_shipped_recipe_validates(monkeypatch):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)
    recipes = sorted((repo / "recipes").rglob("*.yaml"))
    assert recipes
    for path in recipes:
        load_recipe(path)


def test_misspelt_method_name_is_named_with_its_line(tmp_path, data_file):
    [problem] = errors_of(write(tmp_path, base_text(data_file, method="  nme: lora\n  r: 8\n")))
    assert "method.nme (line 4): unknown key 'nme'. Did you mean 'name'?" in problem and "lora" in problem


def test_recipe_that_is_not_utf8_names_the_line(tmp_path, data_file):
    path = tmp_path / "r.yaml"
    path.write_bytes(base_text(data_file).encode() + b"# caf\xe9 notes\n")
    [problem] = errors_of(path)
    assert problem.startswith(f"{path}:6: not UTF-8 text (byte 0xe9 at column 6)")


def test_data_file_that_is_not_utf8_names_the_line(tmp_path):
    from ftune.data.sources import read_rows

    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(FtuneError, match=r"rows.jsonl:2: not UTF-8 text \(byte 0xe9"):
        read_rows(str(path))
