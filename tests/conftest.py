"""Shared fixtures: tiny models built from a config (never downloaded), small data files, recipe writers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

ASSETS = Path(__file__).parent / "assets"
TOKENIZER_DIR = ASSETS / "tiny-tokenizer"
REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Keep imported models out of the user's cache, except the built-in one which is expensive to import."""
    os.environ.setdefault("FTUNE_CACHE_DIR", str(tmp_path_factory.mktemp("ftune-cache")))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama-style causal LM (hidden 64) with the committed tiny chat tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    target = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def alpaca_files(tmp_path_factory) -> tuple[Path, Path]:
    """(train, eval) alpaca JSONL files: a tiny copy task the tiny model can fit in a few steps."""
    root = tmp_path_factory.mktemp("data")
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
    rows = [{"instruction": f"Repeat the word {n} times.", "input": w, "output": " ".join([w] * n)} for n in (1, 2, 3, 4) for w in words]
    held_out = [{"instruction": "Repeat the word 5 times.", "input": w, "output": " ".join([w] * 5)} for w in words]
    return write_jsonl(root / "train.jsonl", rows), write_jsonl(root / "eval.jsonl", held_out)


def recipe_dict(model_dir: Path, train: Path, eval_file: Path, output_dir: Path, **sections) -> dict:
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(train), "eval": str(eval_file), "max_length": 64},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"max_steps": 4, "batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1, "save_steps": 2, "warmup_ratio": 0.0},
        "evaluation": {"max_new_tokens": 4, "batch_size": 8},
        "output_dir": str(output_dir),
    }
    for key, value in sections.items():
        if key != "method" and isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def make_recipe(tmp_path, tiny_llama_dir, alpaca_files):
    """Write a runnable recipe on the tiny model; keyword arguments update sections (``method`` is replaced)."""

    def make(**sections) -> Path:
        train, eval_file = alpaca_files
        recipe = recipe_dict(tiny_llama_dir, train, eval_file, tmp_path / "run", **sections)
        return write_recipe(tmp_path / "recipe.yaml", recipe)

    return make


def recipe_problems(path) -> str:
    """The problems ``load_recipe`` refuses ``path`` with, joined by " | " (the test fails if it loads)."""
    from ftune.errors import FtuneError
    from ftune.recipe import load_recipe

    with pytest.raises(FtuneError) as info:
        load_recipe(path)
    return " | ".join(info.value.problems)


def invoke_ok(*args):
    """Run an ftune command in-process; a crash re-raises with its traceback, any other failure shows the output."""
    from typer.testing import CliRunner

    from ftune.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result
