"""Held-out examples: the rows eval scores and merge checks parity on, as training split them.

Training stores its eval records in ``RUN/heldout.jsonl``, so eval and merge need neither the
training data nor a re-run of the split; ``eval --split FILE`` reads a one-off file the same way.
Tokenization honours the recipe's ``max_length`` and ``truncation`` exactly as training did, so the
loss ``ftune eval`` reports is computed on the examples training evaluated.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ftune.data.formats import Record, assign_label_ids, rows_to_records
from ftune.data.sources import read_rows
from ftune.data.tokenize import tokenize_records
from ftune.errors import FtuneError, raise_problems
from ftune.recipe.data import DATA_SUFFIXES
from ftune.recipe.tasks import CLASSIFICATION
from ftune.run_dir import RunDir, read_jsonl, run_labels


def heldout_rows(records: list[Record]) -> list[dict]:
    """JSON rows of ``records`` for ``RUN/heldout.jsonl`` (and the data cache)."""
    return [asdict(record) for record in records]


def records_of(rows: list[dict]) -> list[Record]:
    return [Record(**row) for row in rows]


def split_file(split: str) -> Path:
    path = Path(split).expanduser()
    if not path.is_file() or path.suffix not in DATA_SUFFIXES:
        raise FtuneError(f"--split {split!r}: expected 'eval' or an existing {'/'.join(DATA_SUFFIXES)} file")
    return path.resolve()


def load_heldout(run: RunDir, recipe, split: str = "eval") -> list[Record]:
    """The run's held-out records (``split='eval'``), or those of a one-off file with the run's labels."""
    if split == "eval":
        if not run.heldout.is_file():
            raise FtuneError(f"{run.root}: no {run.heldout.name} (the run predates held-out storage); pass --split FILE")
        return records_of(read_jsonl(run.heldout))
    records = rows_to_records(read_rows(str(split_file(split))), recipe.task, system_prompt=recipe.data.system_prompt)
    if recipe.task == CLASSIFICATION:
        problems: list[str] = []
        records = assign_label_ids(records, run_labels(run) or [], problems)
        raise_problems(problems)
    return records


def conversations(records: list[Record]) -> list[list[dict]]:
    """The chat conversations among ``records`` (raw text rows have no reply to generate)."""
    return [record.value for record in records if record.kind == "chat"]


def tokenize_heldout(tokenizer, records: list[Record], data_config, *, train_on_prompt: bool | None = None) -> list[dict]:
    """Examples of ``records`` as training tokenized its eval split; any template problem is an error."""
    problems: list[str] = []
    examples, _ = tokenize_records(
        tokenizer, records, max_length=data_config.max_length, truncation=data_config.truncation,
        train_on_prompt=data_config.train_on_prompt if train_on_prompt is None else train_on_prompt, problems=problems,
    )
    raise_problems(problems)
    return examples[:]


def parity_inputs(tokenizer, records: list[Record], data_config, count: int) -> list[list[int]]:
    """Token ids of the first ``count`` held-out examples, prompt and reference answer, as training saw them."""
    chats = [chosen_chat(record) for record in records[:count]]
    return [example["input_ids"] for example in tokenize_heldout(tokenizer, chats, data_config, train_on_prompt=True)]


def chosen_chat(record: Record) -> Record:
    """A preference pair as the conversation it prefers, a KTO row as its conversation (what parity checks run on);
    other records unchanged."""
    if record.kind not in ("preference", "kto"):
        return record
    answer = record.value["chosen"] if record.kind == "preference" else record.value["completion"]
    messages = record.value["prompt"] + [{"role": "assistant", "content": answer}]
    return Record("chat", messages, record.origin, record.source)
