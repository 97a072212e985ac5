"""The data pipeline: recipe data section -> rows -> records -> train/eval split and mix -> tokenized examples.

``build_datasets`` is what training calls; it reuses the on-disk cache when nothing it depends on
changed, and hands back the eval records too (training stores them in the run directory).
``load_records`` stops before tokenization; ``ftune data preview`` and ``ftune preprocess`` are thin
wrappers over the same steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ftune.data.formats import Record, assign_label_ids, convert_rows, label_names_of, resolve_format, unused_columns_note
from ftune.data.heldout import heldout_rows
from ftune.data.sources import fingerprint, read_source, source_name
from ftune.data.splits import carve_eval, drop_eval_duplicates, mix_sources
from ftune.data.templates import install_chat_template
from ftune.data.tokenize import TokenizedExamples, TokenizeStats, tokenize_records
from ftune.errors import MAX_LISTED_PROBLEMS, FtuneError
from ftune.recipe.data import DataConfig
from ftune.recipe.tasks import CAUSAL_LM, CLASSIFICATION


@dataclass
class DataSplits:
    train: TokenizedExamples  # a read-only sequence of {"input_ids", "labels"} dicts
    eval: TokenizedExamples
    train_stats: TokenizeStats
    eval_stats: TokenizeStats
    label_names: list[str] | None = None  # classification: class names in id order
    heldout: list[dict] = field(default_factory=list)  # the eval records as JSON rows (RUN/heldout.jsonl)
    notes: list[str] = field(default_factory=list)  # what the pipeline did that a user should know
    cache_path: Path | None = None
    from_cache: bool = False
    seconds: float = 0.0  # reading + tokenizing time (0 on a cache hit)


@dataclass
class Records:
    train: list[Record]
    eval: list[Record]
    label_names: list[str] | None
    notes: list[str]


def settle_problems(problems: list[str], config: DataConfig, what: str = "rows") -> str | None:
    """Fail listing the first problems, or (``on_error: skip``) return a note saying how many were skipped."""
    if not problems:
        return None
    if config.on_error == "fail":
        extra = len(problems) - MAX_LISTED_PROBLEMS
        raise FtuneError(
            *problems[:MAX_LISTED_PROBLEMS], *([f"... and {extra} more bad {what}"] if extra > 0 else []),
            f"fix these {what}, or set data.on_error: skip to train without them",
        )
    return f"skipped {len(problems)} bad {what} (data.on_error: skip), first: {problems[0]}"


def load_records(config: DataConfig, task: str = CAUSAL_LM) -> Records:
    """Read, convert and check every entry, then carve or clean the eval split and mix the training entries."""
    problems: list[str] = []
    column_notes: list[str] = []
    loaded: dict[str, list[Record]] = {}
    for split in ("train", "eval"):
        loaded[split] = []
        for index, source in enumerate(getattr(config, split)):
            key = f"data.{split}.{index}"
            rows = read_source(source, problems, key=key)
            if not rows:
                continue  # every line was malformed; the problems say which
            name = resolve_format(source, rows, task, key=key, shown=source_name(source))
            if note := unused_columns_note(rows, name, source.columns, key=key, shown=source_name(source)):
                column_notes.append(note)
            tools = [tool.model_dump() for tool in source.tools] if source.tools else None
            loaded[split].extend(convert_rows(rows, name, source.columns, source=index, system_prompt=config.system_prompt,
                                              problems=problems, tools=tools))
    label_names = None
    if task == CLASSIFICATION:
        label_names = label_names_of(loaded["train"] + loaded["eval"], config.labels)
        loaded = {split: assign_label_ids(records, label_names, problems) for split, records in loaded.items()}
    notes = column_notes + [note for note in [settle_problems(problems, config)] if note]
    if not loaded["train"]:
        raise FtuneError("data.train: no usable training rows")
    train, evaluation = loaded["train"], loaded["eval"]
    if config.eval:
        evaluation, note = drop_eval_duplicates(train, evaluation)
        notes += [note] if note else []
    elif config.eval_split:
        train, evaluation, note = carve_eval(train, config)
        notes.append(note)
    train, mix_notes = mix_sources(train, config)
    return Records(train, evaluation, label_names, notes + mix_notes)


def reject_preference(records: Records) -> None:
    """Rows whose meaning this stage would drop: pairs (the rejected answer) and KTO rows (the label: a false one
    would train as a good answer)."""
    for split in ("train", "eval"):
        found = next((r for r in getattr(records, split) if r.kind in ("preference", "kto")), None)
        if found is not None and found.kind == "preference":
            raise FtuneError(
                f"data.{split}.{found.source}.format: preference rows (chosen/rejected) train with stage: dpo; "
                "set stage: dpo, or give chat/instruction rows for stage: sft"
            )
        if found is not None:
            raise FtuneError(
                f"data.{split}.{found.source}: {found.origin} is a KTO row (a completion labelled true or false by "
                "label/kto_tag), which this stage would train as a good answer whatever its label; set stage: kto"
            )


def tokenize_splits(records: Records, tokenizer, config: DataConfig, *, keep_origins: bool = False) -> DataSplits:
    options = dict(max_length=config.max_length, truncation=config.truncation, train_on_prompt=config.train_on_prompt,
                   keep_origins=keep_origins)
    problems: list[str] = []
    train, train_stats = tokenize_records(tokenizer, records.train, problems=problems, **options)
    evaluation, eval_stats = tokenize_records(tokenizer, records.eval, problems=problems, **options)
    notes = list(records.notes)
    skipped = settle_problems(problems, config, "conversations")
    notes += [skipped] if skipped else []
    if not len(train):
        raise FtuneError(
            f"data.max_length: no training example is left ({train_stats.dropped_too_long} longer than {config.max_length} tokens, "
            f"{train_stats.dropped_no_target} with the response cut off); raise data.max_length"
        )
    if records.eval and not len(evaluation):
        raise FtuneError(f"data.max_length: no eval example is left at {config.max_length} tokens; raise data.max_length")
    return DataSplits(train, evaluation, train_stats, eval_stats, records.label_names, heldout_rows(records.eval), notes)


def build_datasets(config: DataConfig, tokenizer, task: str = CAUSAL_LM) -> DataSplits:
    """Tokenized train/eval splits of the recipe's data, from the cache when nothing they depend on changed.

    Installs ``data.chat_template`` on ``tokenizer`` (training saves it with the run).
    """
    from ftune.data.cache import cache_key, load_cached, save_cached

    install_chat_template(tokenizer, config)
    key = cache_key(config, task, tokenizer) if config.cache else None
    cached = load_cached(key) if key else None
    if cached is not None:
        return DataSplits(**cached, from_cache=True)
    clock = time.perf_counter()
    records = load_records(config, task)
    reject_preference(records)
    splits = tokenize_splits(records, tokenizer, config)
    splits.seconds = time.perf_counter() - clock
    if key:
        splits.cache_path = save_cached(key, splits)
    return splits


def describe_splits(splits: DataSplits) -> str:
    """The data section of the training log: counts, what was truncated or dropped, and where it came from."""
    stats = splits.train_stats
    lines = [f"Data: {len(splits.train):,} train / {len(splits.eval):,} eval examples, {stats.tokens:,} train tokens"]
    if splits.label_names is None:
        lines[0] += f" ({100 * stats.trained_tokens / max(stats.tokens, 1):.1f}% trained)"
    else:
        lines[0] += f", {len(splits.label_names)} labels: {', '.join(splits.label_names[:10])}" + (" ..." if len(splits.label_names) > 10 else "")
    for name, s in (("train", stats), ("eval", splits.eval_stats)):
        if s.truncated or s.dropped:
            lines.append(f"  {name}: {s.truncated} truncated to max_length, {s.dropped_too_long} dropped as too long, "
                         f"{s.dropped_no_target} dropped (response cut off), {s.rejected} rejected by the chat template")
    if stats.missing_eos:
        lines.append(f"  warning: {stats.missing_eos} train examples never train the EOS or end-of-turn token; the model "
                     "may not learn to stop (check data.chat_template)")
    lines.extend(f"  {note}" for note in splits.notes)
    if splits.from_cache:
        lines.append(f"  tokenized data loaded from cache, tokenization skipped ({splits.cache_path})")
    elif splits.cache_path:
        lines.append(f"  tokenized in {splits.seconds:.1f} s; cached for the next run ({splits.cache_path})")
    return "\n".join(lines)


def data_fingerprint(config: DataConfig) -> str:
    return fingerprint(config.train + config.eval)
