"""Train/eval splits and dataset mixing, deterministic in ``data.seed`` alone.

Rows are ordered by a hash of (seed, row content), never by Python's salted ``hash`` or by file
order, so the same data and seed give the same split on every machine, even if files are
shuffled or concatenated differently. Exact duplicates share a content key, so a row and its
copies always land on the same side of a carved split.
"""

from __future__ import annotations

import hashlib
import random

from ftune.data.formats import Record
from ftune.data.sources import source_name
from ftune.errors import FtuneError
from ftune.recipe.data import DataConfig


def seeded_order(seed: int, record: Record) -> str:
    return hashlib.sha256(f"{seed}\0{record.content_key}".encode()).hexdigest()


def carve_eval(train: list[Record], config: DataConfig) -> tuple[list[Record], list[Record], str]:
    """Hold out ``data.eval_split`` (a fraction or a count of distinct rows) from train."""
    keys = {}
    for record in train:
        keys.setdefault(record.content_key, record)
    distinct = sorted(keys.values(), key=lambda r: seeded_order(config.seed, r))
    split = config.eval_split
    count = split if isinstance(split, int) else max(1, round(split * len(distinct)))
    if count >= len(distinct):
        raise FtuneError(
            f"data.eval_split: holding out {count} of {len(distinct)} distinct training rows leaves nothing to train on; "
            "lower it or give data.eval files"
        )
    held = {r.content_key for r in distinct[:count]}
    evaluation = [r for r in keys.values() if r.content_key in held]
    note = f"eval: held out {count} of {len(distinct)} distinct training rows (data.eval_split: {split}, seed {config.seed})"
    return [r for r in train if r.content_key not in held], evaluation, note


def drop_eval_duplicates(train: list[Record], evaluation: list[Record]) -> tuple[list[Record], str | None]:
    """Eval rows that also appear in train, exactly, measure memory, not generalisation: remove them."""
    seen = {r.content_key for r in train}
    kept = [r for r in evaluation if r.content_key not in seen]
    removed = [r for r in evaluation if r.content_key in seen]
    if not removed:
        return evaluation, None
    if not kept:
        raise FtuneError(f"data.eval: all {len(evaluation)} eval rows also appear in the training data; give held-out rows or use data.eval_split")
    examples = ", ".join(r.origin for r in removed[:3])
    return kept, f"eval: removed {len(removed)} rows that also appear in train (exact duplicates), e.g. {examples}"


def mix_sources(train: list[Record], config: DataConfig) -> tuple[list[Record], list[str]]:
    """Apply each training entry's ``weight`` or ``samples``: whole repeats, then a seeded sample of the rest."""
    mixed, notes = [], []
    for index, source in enumerate(config.train):
        records = [r for r in train if r.source == index]
        if source.weight is None and source.samples is None:
            mixed.extend(records)
            continue
        if not records:
            raise FtuneError(f"data.train.{index}: no rows left to sample from (all were bad or held out for eval)")
        target = source.samples if source.samples is not None else max(1, round(source.weight * len(records)))
        ordered = sorted(records, key=lambda r: seeded_order(config.seed, r))
        repeats, rest = divmod(target, len(ordered))
        mixed.extend(ordered * repeats + random.Random(f"{config.seed}:mix:{index}").sample(ordered, rest))
        how = f"samples {source.samples}" if source.samples is not None else f"weight {source.weight:g}"
        notes.append(f"mix: data.train.{index} ({source_name(source)}): {len(records)} rows -> {target} ({how})")
    return mixed, notes
