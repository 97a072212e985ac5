"""``ftune plan`` sizes peft's prefixes as training builds them: the key/value width of a grouped-query model, the MLP
of ``prefix_projection`` and the per-head gates of ``init: gated``, each equal to the count of the wrapped tiny model."""

from __future__ import annotations

import json

import pytest

from ftune.recipe import load_recipe
from ftune.training.layout import build_layout, trainable_shapes
from ftune.training.plan import estimate_memory


def trained_count(recipe) -> int:
    from ftune.methods import apply_method, count_parameters
    from ftune.model import load_base_model

    model = apply_method(load_base_model(recipe.model, recipe.quantization), recipe.method, "causal_lm")
    return count_parameters(model)[0]


@pytest.mark.parametrize(
    "method",
    [{"name": "prefix"}, {"name": "prefix", "init": "tokens"}, {"name": "prefix", "num_virtual_tokens": 7, "prefix_projection": True},
     {"name": "ptuning_v2", "num_virtual_tokens": 5}, {"name": "ptuning_v2", "init": "random"}],
    ids=["prefix-gated", "prefix-tokens", "prefix-projection-gated", "ptuning_v2-gated", "ptuning_v2-random"],
)
def test_the_estimate_is_the_trained_count(make_recipe, tiny_llama_dir, method):
    recipe = load_recipe(make_recipe(method=method))
    estimate = estimate_memory(recipe, json.loads((tiny_llama_dir / "config.json").read_text()))
    assert estimate.trainable == trained_count(recipe)
    _, approximate = trainable_shapes(recipe, build_layout(json.loads((tiny_llama_dir / "config.json").read_text())))
    assert not approximate  # the plan says "exact" for these, so it must be


def test_the_gates_are_one_per_head_and_layer(make_recipe, tiny_llama_dir):
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    gated = estimate_memory(load_recipe(make_recipe(method={"name": "prefix"})), config).trainable
    ungated = estimate_memory(load_recipe(make_recipe(method={"name": "prefix", "init": "tokens"})), config).trainable
    assert gated - ungated == config["num_hidden_layers"] * config["num_attention_heads"] == 8


@pytest.mark.parametrize("init", ["gated", "tokens"])
def test_an_encoder_counts_its_gates_too(tmp_path, init):
    """A BERT-style encoder loaded as training loads it takes the gates as a decoder does; the plan counts them."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from ftune.methods import apply_method, count_parameters
    from ftune.model import load_base_model
    from tests.conftest import TOKENIZER_DIR, write_jsonl, write_recipe

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        pad_token_id=tokenizer.pad_token_id)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"text": f"text {i}", "label": "ab"[i % 2]} for i in range(8)])
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", {
        "task": "classification", "model": {"name_or_path": str(tmp_path / "bert")}, "method": {"name": "prefix", "init": init},
        "data": {"train": str(rows), "eval_split": 2, "labels": ["a", "b"]}, "output_dir": str(tmp_path / "run")}))
    model = apply_method(load_base_model(recipe.model, recipe.quantization, task="classification", labels=["a", "b"]), recipe.method,
                         "classification")
    assert estimate_memory(recipe, config.to_dict()).trainable == count_parameters(model)[0]
