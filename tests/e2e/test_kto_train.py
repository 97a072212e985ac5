"""stage: kto on the tiny model: completions labelled desirable or undesirable, in TRL's and LLaMA-Factory's layouts,
train with LoRA (base weights bit-identical, adapter moved), full fine-tuning and QLoRA; the run evaluates (the KL
estimate and the desirable/undesirable implicit rewards against the base) and merges; stage: sft refuses the same rows."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tests.conftest import invoke_ok, write_jsonl

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "star", "rock"]


def trl_rows(words):
    # The desirable answer is the word itself; the undesirable one wraps it in filler.
    rows = []
    for w in words:
        rows += [{"prompt": f"Say {w}.", "completion": w, "label": True},
                 {"prompt": f"Say {w}.", "completion": f"well, maybe {w} or so", "label": False}]
    return rows


def llamafactory_rows(words):
    """LLaMA-Factory's kto_en_demo.json layout: a messages list and a boolean label."""
    return [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}],
             "label": r["label"]} for r in trl_rows(words)]


def alpaca_rows(words):
    return [{"instruction": r["prompt"], "input": "", "output": r["completion"], "label": r["label"]} for r in trl_rows(words)]


LAYOUTS = {"trl": trl_rows, "llamafactory": llamafactory_rows, "alpaca": alpaca_rows}


@pytest.fixture
def kto_recipe(make_recipe, tmp_path):
    def build(layout="trl", **sections):
        rows = LAYOUTS[layout]
        train = write_jsonl(tmp_path / "kto.jsonl", rows(WORDS[:9]))
        held = write_jsonl(tmp_path / "held.jsonl", rows(WORDS[9:]))
        options = dict(stage="kto", data={"train": str(train), "eval": str(held), "max_length": 64},
                       training={"max_steps": 8, "learning_rate": 1e-2, "save_steps": 50, "eval_steps": None})
        options.update(sections)
        return make_recipe(**options)

    return build


def test_kto_with_lora_moves_the_adapter_and_leaves_the_base_bit_identical(kto_recipe):
    import torch

    from ftune.hardware import resolve_precision
    from ftune.methods import apply_method
    from ftune.model import load_base_model, load_tokenizer
    from ftune.recipe import load_recipe
    from ftune.run_dir import prepare_run_dir
    from ftune.training.distributed import Strategy
    from ftune.training.kto import build_kto_splits, kto_spec
    from ftune.training.trainer import build_trainer

    recipe = load_recipe(kto_recipe(training={"max_steps": 3, "learning_rate": 1e-2, "save_steps": 50}))
    run = prepare_run_dir(recipe, overwrite=True, resume=False)
    tokenizer = load_tokenizer(recipe.model)
    splits = build_kto_splits(recipe, tokenizer)
    assert {r["label"] for r in splits.train} == {True, False} and len(splits.train) == 18
    model = apply_method(load_base_model(recipe.model, recipe.quantization), recipe.method, recipe.task)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = build_trainer(kto_spec(model, tokenizer, splits, recipe), model, tokenizer, recipe, run,
                            precision=resolve_precision("no"), strategy=Strategy("single", 1, "single process"), echo=lambda *_: None)
    assert "ref" not in model.peft_config  # the reference is the base with the adapter off, no second adapter copy
    trainer.train()
    after = dict(model.named_parameters())
    adapter = [name for name in before if "lora_" in name]
    assert adapter and any(not torch.equal(before[name], after[name]) for name in adapter)
    assert all(torch.equal(before[name], after[name]) for name in before if "lora_" not in name)


def test_llamafactory_kto_rows_train_evaluate_and_merge(kto_recipe):
    recipe = kto_recipe("llamafactory", training={"max_steps": 8, "learning_rate": 1e-2, "save_steps": 50, "eval_steps": 8})
    result = invoke_ok("train", recipe)
    assert "18 train / 6 eval KTO rows (9 desirable, 9 undesirable)" in result.output
    assert "reference = the base with the adapter switched off" in result.output
    run = recipe.parent / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_kl"] >= 0 and summary["eval_reward_margin"] > 0
    result = invoke_ok("eval", run, "--base")
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    tuned, base = metrics["tuned"], metrics["base"]
    assert tuned["kl"] >= 0 and "kl" in result.output and "reward_margin" in result.output
    assert tuned["reward_margin"] > 0 == base["reward_margin"] and tuned["desirable_reward"] > tuned["undesirable_reward"]
    assert tuned["desirable_logp"] - tuned["undesirable_logp"] > base["desirable_logp"] - base["undesirable_logp"]
    assert tuned["samples"] == 6
    invoke_ok("merge", run)
    assert (run / "merged" / "config.json").is_file()
    invoke_ok("export", run, "--format", "gguf", "--quant", "f16")  # a kto run's weights deploy like any other's
    assert json.loads((run / "export" / "model-f16.gguf.verify.json").read_text())["passed"]


@pytest.mark.parametrize("sections, reference", [
    ({"method": {"name": "full"}}, "a frozen copy of the base"),
    ({"method": {"name": "full"}, "preference": {"precompute_reference": True}}, "precomputed log-probs"),
    ({"quantization": {"bits": 4}}, "the base with the adapter switched off"),
], ids=["full", "full-precomputed", "qlora"])
def test_kto_trains_alpaca_rows_with_full_fine_tuning_and_qlora(kto_recipe, tiny_llama_dir, sections, reference):
    import math

    import torch
    from safetensors.torch import load_file

    recipe = kto_recipe("alpaca", training={"max_steps": 3, "learning_rate": 1e-3, "save_steps": 50, "eval_steps": None}, **sections)
    result = invoke_ok("train", recipe)
    assert f"reference = {reference}" in result.output
    run = recipe.parent / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and math.isfinite(summary["train_loss"])
    if (run / "model" / "model.safetensors").is_file():  # full: the saved weights moved away from the base's
        base, tuned = load_file(str(tiny_llama_dir / "model.safetensors")), load_file(str(run / "model" / "model.safetensors"))
        assert any(not torch.equal(base[name], tuned[name]) for name in base if name in tuned)
    else:  # qlora: the adapter's B matrices left zero
        adapter = load_file(str(run / "model" / "adapter_model.safetensors"))
        assert any(name.endswith("lora_B.weight") and bool(tensor.abs().sum() > 0) for name, tensor in adapter.items())


@pytest.mark.parametrize("layout", ["llamafactory", "alpaca", "trl"])
def test_stage_sft_refuses_kto_rows_and_preview_names_the_stage(kto_recipe, layout):
    from ftune.cli import app

    recipe = kto_recipe(layout, stage="sft")
    preview = invoke_ok("data", "preview", recipe, "-n", "1")
    assert "completion: " in preview.output and "train: 18 KTO rows, 9 desirable / 9 undesirable" in preview.output
    assert "stage: sft refuses them, set stage: kto" in preview.output
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert "data.train.0: " in line and "kto.jsonl:1 is a KTO row" in line and line.rstrip().endswith("set stage: kto")


def test_columns_sft_does_not_read_are_named_at_preview_and_train_time(make_recipe, tmp_path):
    rows = [{"instruction": f"Say {w}.", "output": w, "score": 0.5 + i / 100, "source": "web"} for i, w in enumerate(WORDS)]
    recipe = make_recipe(data={"train": str(write_jsonl(tmp_path / "scored.jsonl", rows)), "eval": [], "eval_split": 2},
                         training={"max_steps": 1, "save_steps": 50})
    expected = "has columns 'score', 'source' that format alpaca does not read; score: no stage trains on a score"
    assert expected in invoke_ok("data", "preview", recipe, "-n", "1").output
    assert expected in invoke_ok("train", recipe).output


def test_preprocess_says_a_kto_run_tokenizes_when_training_starts(kto_recipe):
    from ftune.cli import app

    result = CliRunner().invoke(app, ["preprocess", str(kto_recipe())])
    assert result.exit_code == 2 and "stage: kto tokenizes its rows when training starts" in result.stderr


def test_preference_pairs_are_unpaired_for_kto_and_evaluate_as_kto_rows(make_recipe, tmp_path):
    def pairs(words):
        return [{"prompt": f"Say {w}.", "chosen": w, "rejected": f"well, maybe {w} or so"} for w in words]

    recipe = make_recipe(stage="kto", data={"train": str(write_jsonl(tmp_path / "pairs.jsonl", pairs(WORDS[:9]))),
                                            "eval": str(write_jsonl(tmp_path / "held.jsonl", pairs(WORDS[9:]))), "max_length": 64},
                         training={"max_steps": 2, "save_steps": 50})
    result = invoke_ok("train", recipe)
    assert "18 train / 6 eval KTO rows (9 desirable, 9 undesirable)" in result.output
    assert "unpaired 12 preference pairs into KTO rows: each chosen answer desirable" in result.output
    run = recipe.parent / "run"
    invoke_ok("eval", run)
    assert json.loads((run / "eval" / "metrics.json").read_text())["tuned"]["samples"] == 6


def test_unbalanced_kinds_get_the_weights_that_balance_them():
    from ftune.training.kto import weight_note, with_kl_completions

    rows = [{"label": True}] * 3 + [{"label": False}] * 9
    note = weight_note(rows, 1.0, 1.0)
    assert "set preference.desirable_weight to 3.00-4.00 or preference.undesirable_weight to 0.25-0.33" in note
    assert weight_note(rows, 3.5, 1.0) is None and weight_note(rows[:6], 1.0, 1.0) is None
    kl = with_kl_completions([{"completion_ids": [i]} for i in range(5)], 2)
    assert [r["KL_completion_ids"] for r in kl] == [[1], [0], [3], [2], [4]]  # rotated within each batch, as TRL does
