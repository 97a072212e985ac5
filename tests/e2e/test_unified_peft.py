"""Parallel adapters, MAM and UniPELT through the same path as every method on the tiny Llama's copy
task: ftune train, a crash and --resume that reproduces the uninterrupted loss curve, eval and
generate from the run directory, and a merge that refuses with the reason."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ftune.cli import app
from ftune.recipe import load_recipe, method_class
from ftune.run_dir import RunDir
from ftune.training.run import run_training
from tests.e2e.test_train import CrashAfterCheckpoint

runner = CliRunner()

METHODS = {
    "adapter-parallel": {"name": "adapter", "style": "parallel", "reduction_factor": 4, "scaling": 4.0},
    "mam": {"name": "mam", "num_virtual_tokens": 4, "bottleneck": 16},
    "unipelt": {"name": "unipelt", "lora": {"r": 4}, "prefix": {"num_virtual_tokens": 4}, "adapter": {"bottleneck": 16}},
}
TRAINING = {"max_steps": 6, "save_steps": 3, "logging_steps": 1, "learning_rate": 1e-2}


def losses(run: RunDir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, run.metrics.read_text().splitlines()) if "loss" in r}


@pytest.mark.parametrize("case", sorted(METHODS))
def test_train_resume_eval_generate_and_merge_refusal(case, make_recipe, tmp_path, monkeypatch):
    method = METHODS[case]
    straight = run_training(load_recipe(make_recipe(method=method, training=TRAINING), [f"output_dir={tmp_path / 'straight'}"]),
                            echo=lambda *_: None)
    curve = losses(straight)
    assert curve[6] < curve[1], curve

    recipe_path = make_recipe(method=method, training=TRAINING)
    monkeypatch.setattr("ftune.training.trainer.method_callbacks", lambda *args: [CrashAfterCheckpoint(3)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(load_recipe(recipe_path), echo=lambda *_: None)
    monkeypatch.undo()
    resumed = run_training(load_recipe(recipe_path), resume=True, echo=lambda *_: None)
    # Steps 4-6 after resuming equal the uninterrupted run's only if every trained part came back from the checkpoint.
    assert losses(resumed) == pytest.approx(curve, abs=1e-5)

    result = runner.invoke(app, ["eval", str(resumed.root), "--base", "--max-samples", "4"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((resumed.root / "eval" / "metrics.json").read_text())
    assert metrics["tuned"]["samples"] == 4 and metrics["tuned"]["loss"] < metrics["base"]["loss"]

    from ftune.generation import generate_replies
    from ftune.tuned import load_model

    model, tokenizer = load_model(resumed, load_recipe(resumed.recipe))
    expected = generate_replies(model, tokenizer, [[{"role": "user", "content": "moon"}]], max_new_tokens=3, batch_size=1)[0].text
    result = runner.invoke(app, ["generate", str(resumed.root), "--prompt", "moon", "--max-new-tokens", "3"])
    assert result.exit_code == 0 and result.stdout.strip() == expected.strip(), result.output

    result = runner.invoke(app, ["merge", str(resumed.root)])
    assert result.exit_code == 2
    assert method_class(method["name"]).unmergeable_hint in result.output and "cannot be merged" in result.output
    assert not (resumed.root / "merged").exists()


def test_unipelt_trains_with_gradient_checkpointing(make_recipe, tmp_path):
    result = runner.invoke(app, ["train", str(make_recipe(method=METHODS["unipelt"], training={**TRAINING, "gradient_checkpointing": True}))])
    assert result.exit_code == 0, result.output
    curve = losses(RunDir(tmp_path / "run"))
    assert curve[6] < curve[1]
