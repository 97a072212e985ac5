"""A finished run directory is self-contained: moved away from its training data, every later stage still works,
and eval scores exactly the examples training evaluated."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from tests.conftest import invoke_ok as invoke
from tests.conftest import recipe_dict, write_jsonl, write_recipe



@pytest.mark.parametrize("method", ["lora", "full"])
def test_moved_run_works_without_its_training_data(method, tmp_path, tiny_llama_dir, alpaca_files):
    data = tmp_path / "data"
    data.mkdir()
    train, held_out = (shutil.copy(f, data / f.name) for f in alpaca_files)
    recipe = recipe_dict(tiny_llama_dir, train, held_out, tmp_path / "run", method={"name": method, **({"r": 4} if method == "lora" else {})})
    invoke("train", write_recipe(tmp_path / "recipe.yaml", recipe))

    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(tmp_path / "run", moved)
    shutil.rmtree(data)
    assert str(data) in (moved / "recipe.yaml").read_text()  # the saved recipe still names the old paths

    invoke("eval", moved, "--max-samples", "3")
    assert json.loads((moved / "eval" / "metrics.json").read_text())["tuned"]["samples"] == 3
    if method == "lora":
        invoke("merge", moved)
        assert json.loads((moved / "merged" / "parity.json").read_text())["passed"]
    invoke("export", moved, "--format", "gguf", "--quant", "f32")
    assert (moved / "export" / "model-f32.gguf").is_file()
    invoke("generate", moved, "--prompt", "moon", "--max-new-tokens", "2")


def test_eval_loss_matches_training_eval_with_dropped_long_rows(tmp_path, tiny_llama_dir, alpaca_files):
    """With truncation: drop, ftune eval must score the examples the Trainer evaluated, not truncated copies of all."""
    train, _ = alpaca_files
    short = [{"instruction": "Repeat the word 5 times.", "input": w, "output": " ".join([w] * 5)} for w in ("red", "cat", "sun")]
    long = [{"instruction": "Repeat the word 40 times.", "input": w, "output": " ".join([w] * 40)} for w in ("dog", "moon")]
    held_out = write_jsonl(tmp_path / "eval.jsonl", short + long)
    # One eval batch holds every kept example, so the Trainer's batch mean is the token-weighted mean.
    recipe = recipe_dict(tiny_llama_dir, train, held_out, tmp_path / "run", data={"truncation": "drop"},
                         training={"batch_size": 8, "max_steps": 2})
    invoke("train", write_recipe(tmp_path / "recipe.yaml", recipe))
    trained_eval_loss = json.loads((tmp_path / "run" / "summary.json").read_text())["eval_loss"]
    invoke("eval", tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["tuned"]
    assert metrics["loss"] == pytest.approx(trained_eval_loss, rel=1e-4)
    assert metrics["samples"] == 5  # generation still answers every held-out prompt
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["data"]["truncation"] == "drop"
