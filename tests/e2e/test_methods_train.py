"""``ftune train`` end to end with representative methods on the tiny Llama: QLoRA (with gradient
checkpointing), AdaLoRA's rank allocation, prefix tuning, bottleneck adapters and layer freezing,
with the bitsandbytes 8-bit and paged optimizers."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ftune.cli import app
from ftune.run_dir import RunDir

runner = CliRunner()


def train(recipe, tmp_path) -> RunDir:
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    return RunDir(tmp_path / "run")


def losses(run: RunDir) -> list[float]:
    return [r["loss"] for r in map(json.loads, run.metrics.read_text().splitlines()) if "loss" in r]


def summary(run: RunDir) -> dict:
    return json.loads(run.summary.read_text())


def base_parameter_count(tiny_llama_dir) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama_dir).parameters())


def test_qlora_with_gradient_checkpointing(make_recipe, tiny_llama_dir, tmp_path):
    run = train(make_recipe(quantization={"bits": 4}, training={"gradient_checkpointing": True, "max_steps": 6}), tmp_path)
    figures = summary(run)
    # all-linear, r=4, per layer: q 64+64, k 64+32, v 64+32, o 64+64, gate/up 64+128, down 128+64
    assert figures["trainable_params"] == 2 * 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
    assert figures["total_params"] == base_parameter_count(tiny_llama_dir) + figures["trainable_params"]  # 4-bit counted unpacked
    curve = losses(run)
    assert curve[-1] < curve[0]
    assert (run.model / "adapter_model.safetensors").is_file()


def test_adalora_shrinks_ranks_during_training(make_recipe, tmp_path):
    method = {"name": "adalora", "init_r": 4, "target_r": 2, "tfinal": 1, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    run = train(make_recipe(method=method, training={"max_steps": 6}), tmp_path)
    record = json.loads((run.root / "adalora_ranks.json").read_text())
    assert record["initial_total_rank"] == 4 * 4
    assert record["total_rank"] == 2 * 4 == sum(record["ranks"].values())
    saved = json.loads((run.model / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == 6 and saved["rank_pattern"]


def test_prefix_tuning_trains_virtual_tokens_only(make_recipe, tmp_path):
    run = train(make_recipe(method={"name": "prefix", "num_virtual_tokens": 4}, training={"learning_rate": 1e-1, "max_steps": 8}), tmp_path)
    saved = load_file(run.model / "adapter_model.safetensors")
    gates = sorted(name for name in saved if name.endswith(".prefix_gate.gate"))  # init: gated, one gate per layer
    assert sorted(saved) == sorted(["prompt_embeddings", *gates]) and len(gates) == 2
    assert any(saved[name].max() > 0 for name in gates)  # they start closed: training opened some
    curve = losses(run)
    assert curve[-1] < curve[0]


def test_adapter_trains_with_the_paged_8bit_optimizer(make_recipe, tmp_path):
    run = train(make_recipe(method={"name": "adapter", "reduction_factor": 4}, training={"optimizer": "paged_adamw_8bit"}), tmp_path)
    saved = load_file(run.model / "adapter_model.safetensors")
    ups = [t for name, t in saved.items() if name.endswith("adapter.up.weight")]
    assert len(ups) == 4 and all(t.abs().sum() > 0 for t in ups)  # up starts at zero: non-zero means it trained
    curve = losses(run)
    assert curve[-1] < curve[0]


def test_freeze_trains_the_top_layer_with_the_8bit_optimizer(make_recipe, tiny_llama_dir, tmp_path):
    run = train(make_recipe(method={"name": "freeze", "trainable_layers": 1}, training={"optimizer": "adamw_8bit"}), tmp_path)
    before, after = load_file(tiny_llama_dir / "model.safetensors"), load_file(run.model / "model.safetensors")
    top = [n for n in before if n.startswith("model.layers.1.")]
    assert summary(run)["trainable_params"] == sum(before[n].numel() for n in top)
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]) != (name in top), name  # exactly the top layer changed
    curve = losses(run)
    assert curve[-1] < curve[0]
