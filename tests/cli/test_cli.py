"""CLI behaviour: exit codes, one-line errors without tracebacks, and what each command prints."""

from __future__ import annotations

from typer.testing import CliRunner

from ftune.cli import app

runner = CliRunner()


def test_help_lists_the_lifecycle_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "eval", "validate", "methods"):
        assert command in result.output


def test_help_shows_the_install_extras_it_names():
    result = runner.invoke(app, ["export", "--help"], env={"COLUMNS": "200"})  # one line per option
    assert "pip install 'ftune[llamacpp]'" in result.output  # Rich reads an unescaped [llamacpp] as markup and drops it


def test_validate_prints_resolved_recipe(make_recipe):
    result = runner.invoke(app, ["validate", str(make_recipe())])
    assert result.exit_code == 0
    assert "learning_rate: 0.005" in result.stdout
    assert "lr_scheduler: cosine" in result.stdout  # defaults are spelled out


def test_validate_bad_recipe_exits_2_with_one_line_per_problem(make_recipe):
    path = make_recipe(training={"learning_rat": 0.1, "batch_size": 0})
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert any("training.learning_rat" in line and "Did you mean 'learning_rate'?" in line for line in lines)
    assert any("training.batch_size" in line for line in lines)
    assert "Traceback" not in result.output


def test_train_bad_recipe_fails_before_loading_anything(make_recipe, tmp_path):
    path = make_recipe(method={"name": "lora", "r": -4})
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    assert "method.r" in result.stderr and "greater than 0" in result.stderr
    assert not (tmp_path / "run").exists()


def test_missing_recipe_file():
    result = runner.invoke(app, ["validate", "no/such/recipe.yaml"])
    assert result.exit_code == 2
    assert "recipe file not found" in result.stderr


def test_set_override_reaches_validation(make_recipe):
    result = runner.invoke(app, ["validate", str(make_recipe()), "--set", "training.optimizer=adamw_9bit"])
    assert result.exit_code == 2
    assert "training.optimizer (--set)" in result.stderr and "Did you mean 'adamw_8bit'?" in result.stderr


def test_eval_of_a_directory_that_is_not_a_run(tmp_path):
    result = runner.invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a run directory" in result.stderr


def test_methods_prints_the_capability_matrix():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    header, *rows = result.stdout.splitlines()
    assert "mergeable" in header
    assert any(row.startswith("lora") and " yes " in row for row in rows)
    assert any(row.startswith("full") for row in rows)


def test_debug_flag_shows_the_traceback(make_recipe):
    path = make_recipe(method={"name": "lora", "r": -4})
    result = runner.invoke(app, ["--debug", "validate", str(path)])
    assert result.exit_code != 0 and result.exit_code != 2
    assert result.exception is not None
