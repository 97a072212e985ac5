"""training.kernels: when Liger's kernels are chosen or refused, and what choosing them changes in the Trainer.

Liger's Triton kernels need a CUDA GPU, so here the choice is tested with the GPU and the package stood in for;
the kernels' numerics are liger-kernel's own tests' business and need a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftune.cli import app
from ftune.training.kernels import choose_kernels, liger_blocker
from ftune.recipe import load_recipe
from tests.unit.test_label_positions import ftune_method, lora_model


@pytest.fixture
def liger_installed(monkeypatch):
    import ftune.training.kernels

    monkeypatch.setattr(ftune.training.kernels, "liger_kernel_installed", lambda: True)


def test_liger_is_chosen_on_cuda_for_a_supported_family(tiny_llama_dir, liger_installed):
    assert liger_blocker(lora_model(tiny_llama_dir), stage="sft", cuda=True) is None


def test_liger_needs_cuda(tiny_llama_dir, liger_installed):
    assert "Triton kernels for CUDA GPUs" in liger_blocker(lora_model(tiny_llama_dir), stage="sft", cuda=False)


def test_liger_needs_its_package(tiny_llama_dir, monkeypatch):
    import ftune.training.kernels

    monkeypatch.setattr(ftune.training.kernels, "liger_kernel_installed", lambda: False)
    assert "pip install liger-kernel" in liger_blocker(lora_model(tiny_llama_dir), stage="sft", cuda=True)


def test_liger_refuses_a_family_it_has_no_kernels_for(tiny_llama_dir, liger_installed):
    model = lora_model(tiny_llama_dir)
    model.get_base_model().config.model_type = "gpt2"
    assert "Liger has no kernels for model_type gpt2" in liger_blocker(model, stage="sft", cuda=True)


def test_liger_refuses_a_parallel_adapter_whose_wrapper_it_would_bypass(tiny_llama_dir, liger_installed):
    blocker = liger_blocker(ftune_method(tiny_llama_dir, "adapter", style="parallel", scaling=4.0), stage="sft", cuda=True)
    assert blocker == "the method wraps mlp (ParallelAdapterLayer), whose forward Liger's patch would replace (dropping the method)"
    # The sequential adapter wraps the projections inside the MLP, which Liger's SwiGLU forward still calls.
    assert liger_blocker(ftune_method(tiny_llama_dir, "adapter"), stage="sft", cuda=True) is None


def test_kernels_liger_that_cannot_run_is_an_error_and_auto_falls_back(tiny_llama_dir, make_recipe, liger_installed):
    from ftune.errors import FtuneError

    model = lora_model(tiny_llama_dir)
    with pytest.raises(FtuneError, match=r"training.kernels: liger, but Liger's kernels are Triton kernels .*; set training.kernels: auto or none"):
        choose_kernels(model, load_recipe(make_recipe(training={"kernels": "liger"})), cuda=False)
    auto = choose_kernels(model, load_recipe(make_recipe()), cuda=False)
    assert not auto.liger and auto.reason.startswith("auto: Liger's kernels are Triton kernels")
    assert choose_kernels(model, load_recipe(make_recipe()), cuda=True).liger


def test_train_with_kernels_liger_on_cpu_exits_2_before_training(make_recipe):
    recipe = make_recipe(training={"kernels": "liger", "max_steps": 2})
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "training.kernels: liger, but Liger's kernels are Triton kernels for CUDA GPUs" in result.output
    assert "Traceback" not in result.output
    assert not (recipe.parent / "run" / "summary.json").exists()


@pytest.mark.parametrize("stage", ["dpo", "orpo"])
def test_validate_refuses_liger_for_stages_that_need_the_logits(make_recipe, stage):
    recipe = make_recipe(training={"kernels": "liger"}, stage=stage)
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2
    assert f"training.kernels: liger, but stage {stage} computes its loss from the logits" in result.output


def test_choosing_liger_hands_the_loss_to_the_model_and_leaves_the_layers_eager(make_recipe, monkeypatch, tmp_path):
    import ftune.training.kernels
    from ftune.run_dir import RunDir
    from ftune.training.session import build_session, prepare_hardware

    def session(kernels: str):
        recipe = load_recipe(make_recipe(training={"kernels": kernels, "compile": "auto"}), [f"output_dir={tmp_path / kernels}"])
        run = RunDir(Path(recipe.output_dir))
        run.root.mkdir(parents=True)
        lines = []
        built = build_session(recipe, run, prepare_hardware(recipe, echo=lambda *_: None), echo=lines.append)
        return built.trainer, "\n".join(lines)

    plain, plain_log = session("none")
    assert not plain.args.use_liger_kernel and plain.compute_loss_func is not None
    assert "kernels: none (training.kernels: none)" in plain_log

    monkeypatch.setattr(ftune.training.kernels, "liger_blocker", lambda *a, **k: None)  # as on a GPU with liger-kernel installed
    liger, liger_log = session("auto")
    assert liger.args.use_liger_kernel  # transformers patches the model with Liger's kernels when training starts
    assert liger.compute_loss_func is None  # the model's own (fused linear cross-entropy) loss, from the labels
    assert "Loss: Liger's fused linear cross-entropy" in liger_log
    assert "compile: off (auto: training.kernels: auto chose Liger's Triton kernels" in liger_log
