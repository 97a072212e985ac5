"""The data pipeline through the CLI on the tiny Llama: preview shows trained vs masked tokens without
loading weights, preprocess fills the cache that train then reuses, classification writes labels.json,
and preference data is validated but refused for training."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import ftune.model
from ftune.cli import app
from tests.conftest import write_jsonl

runner = CliRunner()


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FTUNE_CACHE_DIR", str(tmp_path / "cache"))


def test_preview_marks_trained_tokens_and_counts_without_loading_weights(make_recipe, monkeypatch, own_cache):
    monkeypatch.setattr(ftune.model, "load_base_model", lambda *a, **k: pytest.fail("preview loaded model weights"))
    result = runner.invoke(app, ["data", "preview", str(make_recipe()), "-n", "2"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.count("-- train example") == 2 and "<|im_start|>assistant\n[[red<|im_end|>]]" in out
    assert "\x1b[" not in out  # not a terminal: plain brackets, no ANSI codes
    assert "train: 32 rows -> 32 examples" in out and "% of tokens trained, 0 truncated" in out


def test_preprocess_then_train_skips_tokenization_and_packs(make_recipe, own_cache):
    recipe = make_recipe(data={"packing": True})
    first = runner.invoke(app, ["preprocess", str(recipe)])
    assert first.exit_code == 0, first.output
    assert "cached for the next run" in first.stdout
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "tokenized data loaded from cache, tokenization skipped" in result.stdout
    assert "Batching: padding-free packing" in result.stdout


def test_classification_run_writes_label_names(make_recipe, tmp_path, own_cache):
    rows = [{"text": f"{w} film", "label": label} for w, label in (("good", "pos"), ("great", "pos"), ("bad", "neg"), ("awful", "neg"))] * 3
    train = write_jsonl(tmp_path / "cls.jsonl", rows)
    held = write_jsonl(tmp_path / "cls-eval.jsonl", [{"text": "fine film", "label": "pos"}, {"text": "dull film", "label": "neg"}])
    recipe = make_recipe(task="classification", data={"train": str(train), "eval": str(held)}, method={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0})
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "2 labels: neg, pos" in result.stdout and "Batching: dynamic padding" in result.stdout
    assert json.loads((tmp_path / "run" / "labels.json").read_text()) == ["neg", "pos"]


def test_preference_data_is_previewed_and_refused_by_stage_sft(make_recipe, tmp_path, own_cache):
    rows = [{"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]
    recipe = make_recipe(data={"train": str(write_jsonl(tmp_path / "pref.jsonl", rows)), "eval": [], "eval_split": 1})
    preview = runner.invoke(app, ["data", "preview", str(recipe), "-n", "1"])
    assert preview.exit_code == 0, preview.output
    assert "chosen: good" in preview.stdout and "train: 3 valid preference rows" in preview.stdout
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2
    assert "data.train.0.format: preference rows (chosen/rejected) train with stage: dpo" in result.stderr
    assert "Traceback" not in result.output


def test_preview_on_a_terminal_highlights_trained_and_dims_masked_tokens(make_recipe, own_cache):
    from ftune.data.preview import run_preview
    from ftune.recipe import load_recipe

    lines: list[str] = []
    run_preview(load_recipe(make_recipe()), count=1, color=True, echo=lines.append)
    text = "\n".join(lines)
    assert "\x1b[1;32mred<|im_end|>\x1b[0m" in text and text.count("\x1b[2m<|im_start|>") == 1 and "[[" not in text
