"""Data stage: recipe data section -> conversations -> tokenized train/eval splits with response-only labels."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ftune.data.formats import rows_to_conversations
from ftune.data.sources import fingerprint, read_rows
from ftune.data.tokenize import PadCollator, TokenizeStats, tokenize_conversations
from ftune.errors import FtuneError
from ftune.recipe.schema import DataConfig, DatasetSource

__all__ = ["DataSplits", "PadCollator", "build_datasets", "data_fingerprint", "load_conversations"]


@dataclass
class DataSplits:
    train: list[dict]
    eval: list[dict]
    train_stats: TokenizeStats
    eval_stats: TokenizeStats


def _read(sources: list[DatasetSource], config: DataConfig) -> list[list[dict]]:
    conversations = []
    for source in sources:
        rows = read_rows(source.path)
        conversations.extend(rows_to_conversations(rows, source.format, system_prompt=config.system_prompt))
    return conversations


def load_conversations(config: DataConfig) -> tuple[list[list[dict]], list[list[dict]]]:
    """(train, eval) conversations; the eval carve-out depends only on the data and data.seed."""
    train = _read(config.train, config)
    if config.eval:
        return train, _read(config.eval, config)
    order = list(range(len(train)))
    random.Random(config.seed).shuffle(order)
    held_out = max(1, round(len(train) * config.eval_split))
    if held_out >= len(train):
        raise FtuneError(f"data.eval_split: {config.eval_split} of {len(train)} rows leaves nothing to train on")
    eval_ids = set(order[:held_out])
    return [c for i, c in enumerate(train) if i not in eval_ids], [train[i] for i in sorted(eval_ids)]


def build_datasets(config: DataConfig, tokenizer) -> DataSplits:
    train_conversations, eval_conversations = load_conversations(config)
    options = dict(max_length=config.max_length, train_on_prompt=config.train_on_prompt)
    train, train_stats = tokenize_conversations(tokenizer, train_conversations, **options)
    evaluation, eval_stats = tokenize_conversations(tokenizer, eval_conversations, **options)
    if not train:
        raise FtuneError(f"data.max_length: {config.max_length} tokens cut every training response; raise data.max_length")
    return DataSplits(train, evaluation, train_stats, eval_stats)


def data_fingerprint(config: DataConfig) -> str:
    return fingerprint([source.path for source in config.train + config.eval])
