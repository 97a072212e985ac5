"""Mixture-of-experts bases: training keeps the load-balancing loss; all-linear adapts attention and the experts but not
the router; experts can be named with their transformers 4 names; training says what it adapted."""

from __future__ import annotations

import json

import pytest
import torch

from typer.testing import CliRunner

from ftune.cli import app
from tests.conftest import TOKENIZER_DIR, invoke_ok, recipe_dict, write_recipe
from tests.tolerances import assert_close


@pytest.fixture(scope="module")
def tiny_mixtral_dir(tmp_path_factory):
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    target = tmp_path_factory.mktemp("tiny-mixtral")
    MixtralForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.mark.numerical
def test_training_loss_includes_the_router_load_balancing_loss(tiny_mixtral_dir, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from ftune.training.session import keep_router_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir).eval()
    ids = torch.tensor([[5, 9, 14, 3, 7, 21]])
    with torch.no_grad():
        lm_only = model(input_ids=ids, labels=ids).loss
        note = keep_router_loss(model)
        out = model(input_ids=ids, labels=ids)
    assert "0.001 x router load-balancing loss" in note
    assert out.aux_loss is not None and out.aux_loss > 0
    # The same forward gives both losses: only the sum's rounding differs.
    assert_close(out.loss, lm_only + model.config.router_aux_loss_coef * out.aux_loss, steps=1)
    assert keep_router_loss(AutoModelForCausalLM.from_pretrained(tiny_llama_dir)) is None  # dense models: nothing to add


def adapted(run_dir) -> set[str]:
    from safetensors.torch import load_file

    adapter = load_file(run_dir / "model" / "adapter_model.safetensors")
    return {name.removeprefix("base_model.model.model.layers.0.").split(".lora_A")[0] for name in adapter
            if "lora_A" in name and ".layers.0." in name}


def test_lora_on_moe_says_what_it_adapts_and_explicit_targets_leave_the_router_alone(tiny_mixtral_dir, alpaca_files, tmp_path):
    train, eval_file = alpaca_files
    recipe = recipe_dict(tiny_mixtral_dir, train, eval_file, tmp_path / "all", data={"packing": True})
    result = invoke_ok("train", write_recipe(tmp_path / "all.yaml", recipe))
    assert "router load-balancing loss" in result.output
    assert "adapted: down_proj" not in result.output
    assert "adapted: experts.down_proj, experts.gate_up_proj, k_proj, o_proj, q_proj, v_proj\n" in result.output
    assert "mlp.gate" not in adapted(tmp_path / "all")
    summary = json.loads((tmp_path / "all" / "summary.json").read_text())
    assert summary["train_loss"] > 0 and summary["steps"] == 4

    method = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "gate", "w1", "w2", "w3"]}
    recipe = recipe_dict(tiny_mixtral_dir, train, eval_file, tmp_path / "explicit", data={"packing": True}, method=method)
    result = invoke_ok("train", write_recipe(tmp_path / "explicit.yaml", recipe))
    # transformers 5 fuses w1/w3 into experts.gate_up_proj and keeps w2 as experts.down_proj: peft adapts those parameters.
    assert "adapted: experts.down_proj, experts.gate_up_proj, gate.weight, q_proj\n" in result.output
    assert "gate.weight is the mixture-of-experts router" in result.output  # named, so adapted, with a warning
    wrapped = adapted(tmp_path / "explicit")
    assert "mlp.gate" in wrapped and any(name.startswith("mlp.experts") for name in wrapped), wrapped

    recipe.update(method={**method, "target_modules": ["q_proj", "w4"]}, output_dir=str(tmp_path / "typo"))
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "typo.yaml", recipe))])
    assert result.exit_code == 2 and "'w4' match no module of this model; available: " in result.output
    assert "w1, w2, w3" in result.output  # the expert names are offered
