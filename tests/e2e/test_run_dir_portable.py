"""A finished run directory is self-contained: moved away from its training data, every later stage still works
and gives what it gave in place, and eval scores exactly the examples training evaluated."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from tests.conftest import invoke_ok as invoke
from tests.conftest import recipe_dict, write_jsonl, write_recipe
from tests.tolerances import approx, assert_close, forward_steps



def run_outputs(run) -> dict:
    """What eval (3 held-out examples) and generate produce from a run directory."""
    invoke("eval", run, "--max-samples", "3")
    metrics = json.loads((run / "eval" / "metrics.json").read_text())["tuned"]
    return {
        "metrics": {k: v for k, v in metrics.items() if k != "wall_time_s"},
        "predictions": (run / "eval" / "predictions.jsonl").read_text(),
        "reply": invoke("generate", run, "--prompt", "Repeat the word 2 times.\n\nmoon", "--max-new-tokens", "4").stdout,
    }


@pytest.mark.parametrize("method", ["lora", "full"])
def test_moved_run_works_without_its_training_data(method, tmp_path, tiny_llama_dir, alpaca_files):
    import torch
    from transformers import AutoModelForCausalLM

    from ftune.run_dir import load_run
    from ftune.tuned import load_model

    data = tmp_path / "data"
    data.mkdir()
    train, held_out = (shutil.copy(f, data / f.name) for f in alpaca_files)
    recipe = recipe_dict(tiny_llama_dir, train, held_out, tmp_path / "run", method={"name": method, **({"r": 4} if method == "lora" else {})})
    invoke("train", write_recipe(tmp_path / "recipe.yaml", recipe))
    # What the run computes in place, with its training data still there.
    ids = list(range(5, 40))
    model, _ = load_model(*load_run(tmp_path / "run"))
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([ids])).logits[0]
    in_place = run_outputs(tmp_path / "run")
    assert in_place["metrics"]["samples"] == 3 and in_place["reply"].strip()

    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(tmp_path / "run", moved)
    shutil.rmtree(data)
    assert str(data) in (moved / "recipe.yaml").read_text()  # the saved recipe still names the old paths

    # Moved away from its data, the run scores the same examples with the same predictions and replies the same.
    assert run_outputs(moved) == in_place
    if method == "lora":
        invoke("merge", moved)
        assert json.loads((moved / "merged" / "parity.json").read_text())["passed"]
    invoke("export", moved, "--format", "gguf", "--quant", "f32")
    gguf = moved / "export" / "model-f32.gguf"
    exported = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        assert_close(exported(input_ids=torch.tensor([ids])).logits[0], reference, steps=forward_steps(2) + 1)  # + merging


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
    # Both score in float32, in other batches: measured 1e-5 apart after a bf16 run, so the Trainer evaluates without autocast.
    assert metrics["loss"] == approx(trained_eval_loss, steps=forward_steps(2))
    assert metrics["samples"] == 5  # generation still answers every held-out prompt
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["data"]["truncation"] == "drop"
