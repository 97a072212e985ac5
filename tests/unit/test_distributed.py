"""The ``distributed:`` section: what validate refuses, the configs generated from it, the first-save check and the
rules for resuming on another process count."""

from __future__ import annotations

import json

import pytest
import yaml

from ftune.errors import FtuneError
from ftune.recipe import load_recipe


def recipe_file(tmp_path, distributed: dict | None = None, **sections):
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    recipe = {"data": {"train": str(data)}, "method": {"name": "lora"}, "output_dir": str(tmp_path / "out"), **sections}
    if distributed is not None:
        recipe["distributed"] = distributed
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def problem(tmp_path, distributed: dict, **sections) -> str:
    with pytest.raises(FtuneError) as info:
        load_recipe(recipe_file(tmp_path, distributed, **sections))
    return " | ".join(info.value.problems)


@pytest.mark.parametrize(
    ("distributed", "sections", "expected"),
    [
        ({"strategy": "ddp", "fsdp": {"cpu_offload": True}}, {}, "distributed.fsdp.cpu_offload set but distributed.strategy is ddp"),
        ({"fsdp": {"sharding": "grad_op"}}, {}, "distributed.fsdp.sharding set but distributed.strategy is auto"),
        ({"strategy": "fsdp", "fsdp": {"sharding": "hybrid"}}, {}, "hybrid needs FSDP1, which transformers 5 removed"),
        ({"strategy": "fsdp"}, {"method": {"name": "prompt"}}, "fsdp does not support method 'prompt'"),
        ({"strategy": "fsdp"}, {"method": {"name": "prefix"}}, "fsdp does not support method 'prefix' (peft's prompt encoder"),
        ({"strategy": "fsdp"}, {"quantization": {"bits": 8}}, "quantization.bits: 8 cannot be sharded by fsdp"),
        ({"strategy": "fsdp"}, {"quantization": {"bits": 4}}, "needs quantization.quant_storage: bfloat16"),
        ({"strategy": "deepspeed", "deepspeed": {"zero_stage": 2, "offload_params": True}}, {}, "offload_params needs zero_stage: 3"),
        ({"strategy": "deepspeed", "deepspeed": {"offload_optimizer": True}}, {"training": {"optimizer": "adafactor"}},
         "offload_optimizer steps the optimizer on the CPU with DeepSpeed's own AdamW, not training.optimizer: adafactor"),
        ({"strategy": "ddp", "deepspeed": {"zero_stage": 3}}, {}, "distributed.deepspeed.zero_stage set but distributed.strategy is ddp"),
        ({"strategy": "horovod"}, {}, "distributed.strategy"),
    ],
)
def test_impossible_combinations_are_refused_with_the_key_and_the_fix(tmp_path, distributed, sections, expected):
    assert expected in problem(tmp_path, distributed, **sections)


def test_deepspeed_is_refused_when_not_installed_and_accepted_when_it_is(tmp_path, monkeypatch):
    from ftune.recipe import distributed

    monkeypatch.setattr(distributed, "deepspeed_installed", lambda: False)
    assert "needs the deepspeed package: pip install deepspeed" in problem(tmp_path, {"strategy": "deepspeed"})
    monkeypatch.setattr(distributed, "deepspeed_installed", lambda: True)
    recipe = load_recipe(recipe_file(tmp_path, {"strategy": "deepspeed", "deepspeed": {"zero_stage": 3, "offload_params": "yes"}},
                                     quantization={"bits": 4, "quant_storage": "bfloat16"}))
    assert recipe.distributed.deepspeed.offload_params is True and recipe.distributed.shards_parameters
    for optimizer in ("adamw_torch_fused", "adamw_torch"):  # the optimizers DeepSpeed's CPU AdamW stands in for
        offloaded = {"strategy": "deepspeed", "deepspeed": {"offload_optimizer": True}}
        assert load_recipe(recipe_file(tmp_path, offloaded, training={"optimizer": optimizer})).distributed.deepspeed.offload_optimizer


def test_qlora_under_fsdp_with_the_storage_dtype_and_yaml_switch_words(tmp_path):
    path = recipe_file(tmp_path, quantization={"bits": 4, "quant_storage": "bfloat16"})
    path.write_text(path.read_text() + "distributed:\n  strategy: fsdp\n  fsdp:\n    cpu_offload: yes\n")
    recipe = load_recipe(path)
    assert recipe.distributed.fsdp.cpu_offload is True
    from ftune.model import quantization_config

    import torch

    assert quantization_config(recipe.quantization, torch.bfloat16).bnb_4bit_quant_storage == torch.bfloat16


def test_validate_prints_the_strategy(tmp_path):
    from typer.testing import CliRunner

    from ftune.cli import app

    result = CliRunner().invoke(app, ["validate", str(recipe_file(tmp_path, {"strategy": "fsdp", "fsdp": {"sharding": "grad_op"}}))])
    assert result.exit_code == 0, result.output
    assert "# distributed.strategy: fsdp (grad_op shard, one unit per the model's decoder layer); process count from the launch" in result.stderr


def test_strategy_per_process_count():
    from ftune.training.distributed import resolve_strategy
    from ftune.recipe.distributed import DistributedConfig

    fsdp = DistributedConfig(strategy="fsdp")
    assert resolve_strategy(DistributedConfig(), world=1, cuda=False).name == "single"
    assert resolve_strategy(DistributedConfig(), world=2, cuda=False).name == "ddp"
    one = resolve_strategy(fsdp, world=1, cuda=False, wrap_classes=["LlamaDecoderLayer"])
    assert one.name == "single" and "has nothing to shard" in one.description and one.trainer_options == {}
    two = resolve_strategy(fsdp, world=2, cuda=False, wrap_classes=["LlamaDecoderLayer"], gradient_checkpointing=True)
    assert two.trainer_options["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert two.trainer_options["fsdp_config"]["activation_checkpointing"] is True
    with pytest.raises(FtuneError, match="no _no_split_modules"):
        resolve_strategy(fsdp, world=2, cuda=False, wrap_classes=[])
    with pytest.raises(FtuneError, match="deepspeed needs CUDA GPUs"):
        resolve_strategy(DistributedConfig(strategy="deepspeed"), world=2, cuda=False)


def test_generated_configs_are_read_by_accelerate_and_by_the_trainers_deepspeed_resolution(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file
    from ftune.training.distributed import Strategy, accelerate_launch_config, deepspeed_config, fsdp_config
    from ftune.recipe.distributed import DistributedConfig

    section = DistributedConfig(strategy="fsdp", fsdp={"sharding": "grad_op"})
    fsdp = Strategy("fsdp", 4, "test", {"fsdp": True, "fsdp_config": fsdp_config(section, ["Qwen2DecoderLayer"], False)})
    path = tmp_path / "accelerate.yaml"
    path.write_text(yaml.safe_dump(accelerate_launch_config(fsdp, cuda=True)))
    loaded = load_config_from_file(str(path))
    assert loaded.distributed_type.value == "FSDP" and loaded.num_processes == 4
    assert loaded.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "Qwen2DecoderLayer"
    assert loaded.fsdp_config["fsdp_reshard_after_forward"] is False

    # DeepSpeed itself needs CUDA to import; accelerate's reader of its config does not, and transformers' Trainer fills
    # the "auto" values: every one must be a key it fills (read from its own filling code).
    import inspect
    import re

    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    from transformers.integrations import deepspeed as hf_deepspeed

    config = deepspeed_config(DistributedConfig(strategy="deepspeed", deepspeed={"zero_stage": 3, "offload_optimizer": True}), precision="bf16")
    parsed = HfDeepSpeedConfig(json.loads(json.dumps(config)))
    assert parsed.is_zero3() and parsed.is_offload() and parsed.get_value("bf16.enabled") is True
    assert parsed.get_value("zero_optimization.stage3_gather_16bit_weights_on_model_save") is True
    filled = set(re.findall(r'fill_match\(\s*"([a-z_.0-9]+)"', inspect.getsource(hf_deepspeed.HfTrainerDeepSpeedConfig.trainer_config_process)))
    autos = set(auto_keys(config))
    assert autos == {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "optimizer.params.lr",
                     "optimizer.params.betas", "optimizer.params.eps", "optimizer.params.weight_decay"} and autos <= filled
    # ZeRO-Offload refuses a Trainer-built optimizer: the config names DeepSpeed's AdamW when offloading, and only then.
    assert config["optimizer"]["type"] == "AdamW"
    stage2 = deepspeed_config(DistributedConfig(strategy="deepspeed"), precision="no")
    assert HfDeepSpeedConfig(stage2).get_value("zero_optimization.stage") == 2 and not HfDeepSpeedConfig(stage2).is_offload()
    assert "optimizer" not in stage2


def auto_keys(config: dict, prefix: str = ""):
    """The dotted keys whose value is "auto", at any depth."""
    for key, value in config.items():
        if isinstance(value, dict):
            yield from auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            yield prefix + key


@pytest.fixture
def tiny_lora(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def test_first_save_check_passes_a_whole_save_and_fails_empty_partial_or_stale_ones(tmp_path, tiny_lora):
    import torch
    from safetensors.torch import load_file, save_file

    from ftune.training.checkpoints import check_saved_weights

    whole = tmp_path / "whole"
    tiny_lora.save_pretrained(whole)
    check_saved_weights(whole, tiny_lora)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FtuneError, match=r"is empty: .* the strategy's save did not gather the weights"):
        check_saved_weights(empty, tiny_lora)

    tensors = load_file(whole / "adapter_model.safetensors")
    partial = tmp_path / "partial"
    partial.mkdir()
    save_file({k: v for k, v in list(tensors.items())[1:]}, partial / "adapter_model.safetensors")
    with pytest.raises(FtuneError, match="is partial: 1 of 8 trainable tensors missing"):
        check_saved_weights(partial, tiny_lora)

    stale = tmp_path / "stale"  # right names and shapes, other values (a save of the untrained state)
    stale.mkdir()
    save_file({k: torch.zeros_like(v) for k, v in tensors.items()}, stale / "adapter_model.safetensors")
    with pytest.raises(FtuneError, match="does not hold the trained values"):
        check_saved_weights(stale, tiny_lora)


def processes_file(checkpoint, **layout):
    checkpoint.mkdir(parents=True)
    (checkpoint / "ftune-processes.json").write_text(json.dumps(layout))
    return checkpoint


def test_resume_keeps_the_rows_per_step_or_says_which_counts_can(tmp_path):
    from ftune.training.checkpoints import resume_accumulation

    recipe = load_recipe(recipe_file(tmp_path, training={"batch_size": 2, "gradient_accumulation_steps": 1}))
    ddp = processes_file(tmp_path / "ddp" / "checkpoint-2", world_size=2, batch_size=2, accumulation=1, strategy="ddp")
    assert resume_accumulation(ddp, recipe, world_size=1, strategy="single") == 2
    assert resume_accumulation(ddp, recipe, world_size=2, strategy="ddp") == 1
    with pytest.raises(FtuneError, match=r"took 4 rows per optimizer step .* resume with --nproc in \[1, 2\]"):
        resume_accumulation(ddp, recipe, world_size=4, strategy="ddp")

    fsdp = processes_file(tmp_path / "fsdp" / "checkpoint-2", world_size=2, batch_size=2, accumulation=2, strategy="fsdp")
    assert resume_accumulation(fsdp, recipe, world_size=4, strategy="fsdp") == 1
    with pytest.raises(FtuneError, match="written under fsdp by 2 processes and this launch runs single.*--nproc 2 or more"):
        resume_accumulation(fsdp, recipe, world_size=1, strategy="single")
    zero = processes_file(tmp_path / "ds" / "checkpoint-2", world_size=2, batch_size=2, accumulation=1, strategy="deepspeed")
    with pytest.raises(FtuneError, match=r"DeepSpeed partitions the optimizer state per process; resume on the same count \(--nproc 2\)"):
        resume_accumulation(zero, recipe, world_size=1, strategy="single")

    legacy = tmp_path / "legacy" / "checkpoint-2"  # written before the record existed: one RNG file per rank
    legacy.mkdir(parents=True)
    for rank in (0, 1):
        (legacy / f"rng_state_{rank}.pth").write_bytes(b"")
    assert resume_accumulation(legacy, recipe, world_size=1, strategy="single") == 2


def test_a_dora_save_counts_as_whole(tmp_path, tiny_llama_dir):
    """peft saves DoRA's magnitude (a module's weight in the model) as one tensor named after the module."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ftune.training.checkpoints import check_saved_weights

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    assert any(name.endswith("lora_magnitude_vector.default.weight") for name, _ in model.named_parameters())
    check_saved_weights(tmp_path, model)
