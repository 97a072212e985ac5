"""Memory plan: parameter counts match real models, each component follows its setting, and train refuses what cannot fit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from ftune import resources
from ftune.training import plan
from ftune.cli import app
from ftune.errors import FtuneError
from ftune.training.layout import build_layout
from ftune.training.plan import estimate_memory
from ftune.recipe import load_recipe

runner = CliRunner()


def config_of(model_dir) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def test_layout_counts_every_parameter_of_a_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert build_layout(config_of(tiny_llama_dir)).total_params == sum(p.numel() for p in model.parameters())


def test_layout_counts_every_parameter_of_a_bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    model = BertModel(config)
    assert build_layout(config.to_dict()).total_params == sum(p.numel() for p in model.parameters())


def test_unknown_architecture_is_a_one_line_error():
    with pytest.raises(FtuneError, match="cannot lay out model_type 'mamba'"):
        build_layout({"model_type": "mamba", "hidden_size": 8})


def test_lora_and_full_trainable_counts_match_what_training_reports(make_recipe, tiny_llama_dir):
    config = config_of(tiny_llama_dir)
    lora = estimate_memory(load_recipe(make_recipe()), config)
    assert lora.trainable == 8192  # what tests/e2e/test_train.py measures for this recipe after apply_method
    full = estimate_memory(load_recipe(make_recipe(method={"name": "full"})), config)
    assert full.trainable == full.parameters and full.trainable_mib == 0  # trained tensors are the weights
    assert lora.gradients_mib == pytest.approx(8192 * 4 / 2**20)


@pytest.mark.parametrize(("optimizer", "per_param"), [("adamw_torch_fused", 8), ("adamw_torch", 8), ("adamw_8bit", 2), ("paged_adamw_8bit", 2), ("sgd", 0)])
def test_optimizer_states_follow_the_optimizer(make_recipe, tiny_llama_dir, optimizer, per_param):
    estimate = estimate_memory(load_recipe(make_recipe(training={"optimizer": optimizer})), config_of(tiny_llama_dir))
    assert estimate.optimizer_mib == pytest.approx(estimate.trainable * per_param / 2**20)


def test_every_optimizer_the_recipe_accepts_has_a_plan(make_recipe, tiny_llama_dir):
    from typing import get_args

    from ftune.recipe.schema import TrainingConfig

    for optimizer in get_args(TrainingConfig.model_fields["optimizer"].annotation):
        estimate = estimate_memory(load_recipe(make_recipe(training={"optimizer": optimizer})), config_of(tiny_llama_dir))
        assert estimate.optimizer_mib >= 0, optimizer


def test_adafactor_factors_its_state(make_recipe, tiny_llama_dir):
    config = config_of(tiny_llama_dir)
    adamw = estimate_memory(load_recipe(make_recipe(method={"name": "full"})), config)
    adafactor = estimate_memory(load_recipe(make_recipe(method={"name": "full"}, training={"optimizer": "adafactor"})), config)
    assert 0 < adafactor.optimizer_mib < adamw.optimizer_mib / 4


def test_activations_scale_with_the_batch_and_shrink_with_checkpointing(make_recipe, tiny_llama_dir):
    config = config_of(tiny_llama_dir)
    small = estimate_memory(load_recipe(make_recipe(training={"batch_size": 2})), config)
    large = estimate_memory(load_recipe(make_recipe(training={"batch_size": 8})), config)
    checkpointed = estimate_memory(load_recipe(make_recipe(training={"batch_size": 8, "gradient_checkpointing": True})), config)
    assert large.activations_mib == pytest.approx(4 * small.activations_mib)
    assert checkpointed.activations_mib < large.activations_mib
    assert large.tokens_per_step == 8 * 64
    accumulated = estimate_memory(load_recipe(make_recipe(training={"batch_size": 2, "gradient_accumulation_steps": 4})), config)
    assert accumulated.tokens_per_step == large.tokens_per_step and accumulated.activations_mib == small.activations_mib


def test_4bit_weights_are_about_an_eighth(make_recipe, tmp_path):
    config = {"model_type": "llama", "hidden_size": 1024, "num_hidden_layers": 8, "intermediate_size": 4096,
              "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 1000}
    full = estimate_memory(load_recipe(make_recipe()), config, precision="no")  # float32 weights, not a bf16-held base
    qlora = estimate_memory(load_recipe(make_recipe(quantization={"bits": 4})), config)
    assert 0.1 < qlora.weights_mib / full.weights_mib < 0.2


def test_plan_command_prints_every_component_without_torch(make_recipe):
    """Speed follows from loading no weights and no torch; asserting wall time would only measure the machine's load."""
    path = make_recipe()
    code = (
        "import sys, time\nstart = time.perf_counter()\nfrom typer.testing import CliRunner\nfrom ftune.cli import app\n"
        f"result = CliRunner().invoke(app, ['plan', {str(path)!r}])\nassert result.exit_code == 0, result.output\n"
        "print(result.output)\nprint('elapsed', time.perf_counter() - start)\n"
        "print('heavy', [m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "heavy []" in out
    for row in ("weights", "trainable params", "gradients", "optimizer states", "activations", "eval batch", "total (peak)"):
        assert f"  {row}" in out
    assert "Tokens per optimizer step: up to 256 (4 x 64 x 1 accumulation)" in out


def fake_free(monkeypatch, mib):
    monkeypatch.setattr(resources, "free_memory_mib", lambda device: mib)
    monkeypatch.setattr("ftune.training.run.free_memory_mib", lambda device: mib)


def plan_total(path, *overrides):
    from ftune.training.plan import plan_recipe

    return plan_recipe(load_recipe(path, list(overrides)), device="cpu").total_mib


def test_train_refuses_a_run_that_cannot_fit_and_names_the_cheapest_fix(make_recipe, monkeypatch, tmp_path):
    path = make_recipe(method={"name": "full"}, training={"batch_size": 8})
    needed = plan_total(path)
    with_checkpointing = plan_total(path, "training.gradient_checkpointing=true")
    assert with_checkpointing < needed

    fake_free(monkeypatch, (with_checkpointing + needed) / 2)
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    assert "cheapest fix: --set training.gradient_checkpointing=true" in result.stderr and "--force" in result.stderr
    assert not (tmp_path / "run" / "model").exists()


def test_the_fix_falls_back_to_smaller_batches_then_qlora(make_recipe, tiny_llama_dir):
    config = config_of(tiny_llama_dir)
    recipe = load_recipe(make_recipe(training={"batch_size": 8, "gradient_checkpointing": True}))
    needed = estimate_memory(recipe, config).total_mib
    quarter = estimate_memory(load_recipe(make_recipe(training={"batch_size": 2, "gradient_accumulation_steps": 4, "gradient_checkpointing": True})), config).total_mib
    fix = plan.cheapest_fix(recipe, config, device="cpu", free_mib=(quarter + needed) / 2)
    assert fix.startswith("--set training.batch_size=4 --set training.gradient_accumulation_steps=2")
    assert plan.cheapest_fix(recipe, config, device="cpu", free_mib=1.0) is None


def test_force_trains_anyway(make_recipe, monkeypatch, tmp_path):
    fake_free(monkeypatch, 1.0)
    result = runner.invoke(app, ["train", str(make_recipe(training={"max_steps": 1, "save_steps": 1})), "--force"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "summary.json").is_file()


@pytest.mark.parametrize(
    ("files", "free"),
    [({"memory.max": "max\n", "memory.current": "100\n"}, None), ({"memory.max": "3145728\n", "memory.current": "1048576\n"}, 2.0),
     ({"memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": "5\n"}, None), ({}, None)],
)
def test_cgroup_memory_limit_is_read_from_v2_and_v1_files(tmp_path, files, free):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert resources.cgroup_memory_free_mib(tmp_path, membership=tmp_path / "no-such-file") == free


def test_cgroup_memory_limit_of_the_own_v1_cgroup(tmp_path):
    job = tmp_path / "memory" / "runner" / "job1"
    job.mkdir(parents=True)
    (job / "memory.limit_in_bytes").write_text(str(4 * 2**30))
    (job / "memory.usage_in_bytes").write_text(str(2**30))
    membership = tmp_path / "cgroup"
    membership.write_text("5:cpu,cpuacct:/\n4:memory:/runner/job1\n0::/\n")
    assert resources.cgroup_memory_free_mib(tmp_path, membership) == 3 * 1024


def tiny_bert(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from tests.conftest import TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        pad_token_id=tokenizer.pad_token_id)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


@pytest.mark.parametrize(
    "method",
    [{"name": "full"}, {"name": "bitfit"}, {"name": "freeze", "trainable_layers": 1}, {"name": "lora", "r": 4, "target_modules": ["query", "value"]}],
)
def test_trainable_count_matches_the_wrapped_encoder(tmp_path, method):
    from ftune.methods import apply_method, count_parameters
    from ftune.model import load_base_model
    from tests.conftest import write_jsonl, write_recipe

    model_dir = tiny_bert(tmp_path)
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"text": f"text {i}", "label": "ab"[i % 2]} for i in range(8)])
    recipe = {"task": "classification", "model": {"name_or_path": str(model_dir)}, "data": {"train": str(rows), "eval_split": 2, "labels": ["a", "b"]},
              "method": method, "output_dir": str(tmp_path / "run")}
    loaded = load_recipe(write_recipe(tmp_path / "recipe.yaml", recipe))
    model = apply_method(load_base_model(loaded.model, loaded.quantization, task="classification", labels=["a", "b"]), loaded.method, "classification")
    trainable, total = count_parameters(model)
    estimate = estimate_memory(loaded, config_of(model_dir))
    assert estimate.trainable == trainable
    if method["name"] == "full":
        assert estimate.parameters + 2 * 32 + 2 == total  # the plan counts the base; the head (32 x 2 + bias) comes on top
