"""Tokenized-data cache: a second build reads the cache instead of tokenizing; changing any input it depends
on (data bytes, tokenizer, template, options, task) misses; packing does not; a failed write leaves nothing."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

import ftune.data as data
from ftune.data import build_datasets
from ftune.data.cache import cache_root
from ftune.data.tokenize import TokenizedExamples
from ftune.recipe.data import DataConfig
from tests.conftest import TOKENIZER_DIR, write_jsonl


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FTUNE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def files(tmp_path):
    rows = [{"instruction": f"say {i}", "output": str(i)} for i in range(12)]
    return write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "eval.jsonl", [{"instruction": "x", "output": "y"}])


def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def build(files, task="causal_lm", tok=None, **options):
    train, evaluation = files
    return build_datasets(DataConfig(train=str(train), eval=str(evaluation), **options), tok or tokenizer(), task)


def test_second_build_reads_the_cache_without_reading_rows(cache_dir, files, monkeypatch):
    first = build(files)
    assert not first.from_cache and first.cache_path.parent == cache_root() == cache_dir / "data"
    monkeypatch.setattr(data, "load_records", lambda *a, **k: pytest.fail("rows were read again"))
    second = build(files)
    assert second.from_cache and second.cache_path == first.cache_path
    assert list(second.train) == list(first.train) and list(second.eval) == list(first.eval)
    assert second.train_stats == first.train_stats and second.notes == first.notes
    assert "tokenization skipped" in data.describe_splits(second)


@pytest.mark.parametrize("change", ["data", "max_length", "train_on_prompt", "template", "tokenizer", "task"])
def test_changing_an_input_misses_the_cache(cache_dir, files, change):
    first = build(files)
    tok, options, task = tokenizer(), {}, "causal_lm"
    if change == "data":
        files[0].write_text(files[0].read_text().replace('"0"', '"zero"'))
    elif change == "max_length":
        options["max_length"] = 512
    elif change == "train_on_prompt":
        options["train_on_prompt"] = True
    elif change == "template":
        options["chat_template"] = "chatml"
    elif change == "tokenizer":
        tok.add_tokens(["<|new|>"])
    elif change == "task":
        task = "classification"
        files[0].write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
        files[1].write_text('{"text": "c", "label": "x"}\n')
    second = build(files, task, tok, **options)
    assert not second.from_cache and second.cache_path != first.cache_path


def test_packing_and_cache_flag_do_not_change_the_key(cache_dir, files):
    first = build(files, packing=True)
    assert build(files, packing=False).cache_path == first.cache_path
    assert build(files, cache=False).cache_path is None  # caching off: neither read nor written


def test_a_failed_write_leaves_no_entry(cache_dir, files, monkeypatch):
    def broken_save(self, path):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(TokenizedExamples, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        build(files)
    assert list((cache_dir / "data").iterdir()) == []


def test_a_corrupt_entry_is_rebuilt(cache_dir, files):
    first = build(files)
    (first.cache_path / "train.npz").write_bytes(b"garbage")
    again = build(files)
    assert not again.from_cache and list(again.train) == list(first.train)
    assert build(files).from_cache
