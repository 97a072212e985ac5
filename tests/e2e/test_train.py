"""End-to-end training on the tiny Llama: what changed, what did not, and what the run directory holds."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ftune.cli import app
from ftune.errors import FtuneError
from ftune.recipe import load_recipe
from ftune.run_dir import RunDir
from ftune.training.run import run_training
from tests.tolerances import approx, assert_same_updates, forward_steps

runner = CliRunner()


def base_state(model_dir) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def losses(run: RunDir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, run.metrics.read_text().splitlines()) if "loss" in r}


def test_lora_trains_adapter_only_and_writes_a_complete_run_dir(make_recipe, tiny_llama_dir, tmp_path):
    result = runner.invoke(app, ["train", str(make_recipe())])
    assert result.exit_code == 0, result.output
    run = RunDir(tmp_path / "run")
    for path in (run.recipe, run.manifest, run.metrics, run.summary, run.loss_plot, run.model / "adapter_model.safetensors"):
        assert path.is_file(), path
    assert (run.model / "tokenizer.json").is_file()

    adapter = load_file(run.model / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: non-zero means it trained
    assert not any("base_layer" in name or "embed" in name for name in adapter)

    from ftune.tuned import load_model

    model, _ = load_model(run, load_recipe(run.recipe))
    original = base_state(tiny_llama_dir)
    reloaded = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n}
    for name, tensor in original.items():
        assert torch.equal(reloaded[name], tensor), f"base parameter {name} changed"

    summary = json.loads(run.summary.read_text())
    assert summary["steps"] == 4 and summary["trainable_params"] == 8192
    assert 0 < summary["trainable_share"] < 0.1 and summary["tokens_per_second"] > 0 and "eval_loss" in summary
    manifest = json.loads(run.manifest.read_text())
    assert manifest["versions"]["torch"] and len(manifest["data_fingerprint"]) == 64 and manifest["seed"] == 42
    precision = manifest["mixed_precision"]
    assert precision["requested"] == "auto" and precision["used"] in ("no", "bf16") and precision["reason"] and precision["warning"] is None
    assert f"mixed precision: auto -> {precision['used']} ({precision['reason']})" in result.output
    assert "attention: sdpa" in result.output  # no flash-attn on CPU
    # which ftune then runs example by example over packed rows, once the model's logits agree with it
    assert manifest["hardware"]["attention"] == "ftune_packed_sdpa" and "sdpa example by example" in result.output
    assert summary["computed_tokens_per_second"] > 0
    assert manifest["hardware"]["tf32"] is False or torch.cuda.is_available()  # TF32 needs an Ampere+ GPU
    threads = manifest["hardware"]["threads"]
    assert threads["used"] == torch.get_num_threads() >= 1 and f"threads: {threads['used']} ({threads['reason']})" in result.output
    assert [r["step"] for r in map(json.loads, run.metrics.read_text().splitlines()) if "loss" in r] == [1, 2, 3, 4]


def test_full_finetuning_changes_every_weight(make_recipe, tiny_llama_dir, tmp_path):
    run = run_training(load_recipe(make_recipe(method={"name": "full"})), echo=lambda *_: None)
    trained, original = base_state(run.model), base_state(tiny_llama_dir)
    assert trained.keys() == original.keys()
    changed = [name for name in original if not torch.equal(trained[name], original[name])]
    assert len(changed) == len(original)


@pytest.mark.numerical
def test_fused_adamw_is_the_default_and_trains_as_the_per_tensor_loop_does(make_recipe, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    fused_flags = []

    class RecordFused(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            fused_flags.append(optimizer.param_groups[0]["fused"])

    # Full fine-tuning: the optimizer steps every weight, so any difference in the update shows in the saved model.
    monkeypatch.setattr("ftune.training.trainer.method_callbacks", lambda *args: [RecordFused()])
    # float32 on every machine: auto picks bf16 autocast where the CPU has AVX512-BF16, and there a weight one float32
    # ulp apart in the two runs can round to the next bf16 value, moving its gradients by ~2^-8: a difference of
    # autocast, not of the optimizer (the master weights and AdamW's arithmetic are float32 either way).
    path = make_recipe(method={"name": "full"}, training={"mixed_precision": "no"})
    fused = run_training(load_recipe(path), echo=lambda *_: None)
    loop = run_training(load_recipe(path, ["training.optimizer=adamw_torch", f"output_dir={tmp_path / 'loop'}"]), echo=lambda *_: None)
    assert fused_flags == [True] * 4 + [None] * 4  # None: torch's per-tensor loop on CPU
    # The fused kernel and the loop round AdamW's update differently; from step 2 on the weights, hence the gradients,
    # differ by that rounding, and each step carries it through the forward, the backward and the next update: 7 stages
    # a step on the 2-layer model, 28 in all, so each weight may be off by rtol(28 stages) = 2.3e-4 of the 1.25e-2 the
    # 4 steps' learning rates sum to (cosine: 5e-3 down to 7e-4), 2.8e-6, plus a float32 ulp a step. Measured with
    # AVX512 and AVX2 kernels: every entry within 1/20 of that. A fused run that skips its last, smallest step leaves
    # nearly every entry off by more (by up to 7e-4).
    steps = 4 * (forward_steps(2, backward=True) + 1)
    assert losses(fused) == approx(losses(loop), steps=steps)
    lrs = [record["learning_rate"] for record in map(json.loads, loop.metrics.read_text().splitlines()) if "loss" in record]
    assert len(lrs) == 4
    assert_same_updates(base_state(fused.model), base_state(loop.model), lrs=lrs, steps=steps)


def test_tokens_seen_counts_every_example_whole_while_a_shared_prompt_is_computed_once(make_recipe, tmp_path):
    from ftune.data import build_datasets
    from ftune.model import load_tokenizer

    path = make_recipe(training={"max_steps": 8, "batch_size": 4, "save_steps": 100})  # one epoch of the 32 rows
    recipe = load_recipe(path)
    rows = build_datasets(recipe.data, load_tokenizer(recipe.model), recipe.task).train
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    summary = json.loads(RunDir(tmp_path / "run").summary.read_text())
    assert len(rows) == 32 and summary["tokens_seen"] == sum(len(row["input_ids"]) for row in rows)
    # every row opens with the chat template and "Repeat the word ": the model ran well under the data's tokens
    computed = summary["computed_tokens_per_second"] * summary["wall_time_s"]
    assert 0 < computed < 0.8 * summary["tokens_seen"]


def test_non_empty_output_dir_is_never_clobbered(make_recipe, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("keep me")
    result = runner.invoke(app, ["train", str(make_recipe())])
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert (tmp_path / "run" / "precious.txt").read_text() == "keep me"
    result = runner.invoke(app, ["train", str(make_recipe()), "--overwrite"])
    assert result.exit_code == 0 and not (tmp_path / "run" / "precious.txt").exists()


def test_target_module_typo_lists_existing_modules(make_recipe, tmp_path):
    path = make_recipe(method={"name": "lora", "r": 4, "target_modules": ["q_proj", "v_prj"]})
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    assert "method.target_modules: 'v_prj' match no module" in result.stderr
    assert "v_proj" in result.stderr and "q_proj" in result.stderr.split("available:")[1]


class CrashAfterCheckpoint:
    """A Trainer callback that dies right after the checkpoint at ``step`` is written (a simulated crash)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_resume_reproduces_the_uninterrupted_loss_curve(make_recipe, tmp_path, monkeypatch):
    training = {"max_steps": 6, "save_steps": 3, "logging_steps": 1}
    straight = run_training(load_recipe(make_recipe(training=training), [f"output_dir={tmp_path / 'straight'}"]), echo=lambda *_: None)

    recipe = load_recipe(make_recipe(training=training))
    monkeypatch.setattr("ftune.training.trainer.method_callbacks", lambda *args: [CrashAfterCheckpoint(3)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(recipe, echo=lambda *_: None)
    interrupted = RunDir(tmp_path / "run")
    assert not interrupted.is_complete() and not interrupted.summary.exists()
    monkeypatch.undo()

    with pytest.raises(FtuneError, match="--overwrite"):
        run_training(recipe, echo=lambda *_: None)
    resumed = run_training(recipe, resume=True, echo=lambda *_: None)
    assert sorted(losses(resumed)) == [1, 2, 3, 4, 5, 6]
    assert losses(resumed) == pytest.approx(losses(straight), abs=1e-6)


def test_resume_of_nothing_is_a_user_error(make_recipe):
    result = runner.invoke(app, ["train", str(make_recipe()), "--resume"])
    assert result.exit_code == 2 and "holds no run to continue" in result.stderr


def test_crash_while_saving_leaves_no_complete_looking_run(make_recipe, tmp_path, monkeypatch):
    def broken_save(model, name, directory):
        (directory / "partial.bin").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("ftune.training.run.save_method_artifact", broken_save)
    with pytest.raises(OSError):
        run_training(load_recipe(make_recipe()), echo=lambda *_: None)
    run = RunDir(tmp_path / "run")
    assert not run.model.exists() and not run.summary.exists()
    assert not [p for p in run.root.iterdir() if p.name.startswith(".model")]


def test_qlora_4bit_trains_on_cpu(make_recipe, tmp_path):
    path = make_recipe(quantization={"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"})
    run = run_training(load_recipe(path), echo=lambda *_: None)
    adapter = load_file(run.model / "adapter_model.safetensors")
    assert all(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)
    summary = json.loads(run.summary.read_text())
    assert summary["steps"] == 4 and summary["train_loss"] == summary["train_loss"]  # not NaN


def test_no_hub_token_in_the_run_directory(make_recipe, tmp_path, monkeypatch):
    secret = "hf_SECRETtoken1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", secret)
    run = run_training(load_recipe(make_recipe()), echo=lambda *_: None)
    for path in run.root.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"token leaked into {path}"


def test_eval_scores_tuned_and_base(make_recipe, tmp_path):
    run = run_training(load_recipe(make_recipe()), echo=lambda *_: None)
    result = runner.invoke(app, ["eval", str(run.root), "--base"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run.eval_dir / "metrics.json").read_text())
    assert metrics["tuned"]["samples"] == 8 and "delta" in metrics
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"]  # trained on the same copy task
    predictions = (run.eval_dir / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 16
    result = runner.invoke(app, ["eval", str(run.root), "--min", "exact_match=1.01"])
    assert result.exit_code == 1 and "below threshold" in result.stderr
    shutil.rmtree(run.root)


def test_summary_train_loss_covers_every_step_whatever_the_logging_interval(make_recipe, tmp_path):
    every = run_training(load_recipe(make_recipe(training={"max_steps": 7, "logging_steps": 1, "save_steps": 4})), echo=lambda *_: None)
    per_step = losses(every)
    sparse = run_training(load_recipe(make_recipe(training={"max_steps": 7, "logging_steps": 5, "save_steps": 4}), ["output_dir=" + str(tmp_path / "sparse")]), echo=lambda *_: None)
    summary = json.loads(sparse.summary.read_text())
    assert sorted(losses(sparse)) == [1, 4, 5, 7]  # first step, the checkpoint, the interval, the last step
    assert summary["train_loss"] == pytest.approx(sum(per_step.values()) / 7, rel=1e-6)
