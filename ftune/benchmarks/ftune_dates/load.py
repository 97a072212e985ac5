"""Reads the questions of the local ``ftune_dates`` task from the JSONL file beside this one, so the task runs the
same from any working directory (lm-evaluation-harness calls ``questions`` through the YAML's ``custom_dataset``)."""

from __future__ import annotations

import json
from pathlib import Path

QUESTIONS = Path(__file__).with_name("ftune_dates.jsonl")


def questions(**_metadata):
    """The task's one split, ``test``, as a datasets.DatasetDict (lm-evaluation-harness passes its metadata; unused)."""
    import datasets

    rows = [json.loads(line) for line in QUESTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
