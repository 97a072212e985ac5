"""The rows of the stages that tokenize their data themselves (dpo, orpo, reward, kto, grpo): read, checked, described.

Each of them reads the recipe's records through the data pipeline with the chat template installed, refuses a row of
another kind with the stage that trains on it, tokenizes the rest its own way, and hands the session a ``StageSplits``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ftune.errors import FtuneError
from ftune.recipe import Recipe
from ftune.recipe.tasks import CAUSAL_LM


@dataclass
class StageSplits:
    train: list[dict]
    eval: list[dict]
    heldout: list[dict]  # the eval records as JSON rows (RUN/heldout.jsonl)
    notes: list[str] = field(default_factory=list)
    label_names: list[str] | None = None  # reward: the score head's one output
    reward_files: list[str] = field(default_factory=list)  # grpo: the function rewards' files, copied into the run directory


def read_stage_records(recipe: Recipe, tokenizer, *, kinds: tuple[str, ...], trains_on: str, fix: Callable[[str], str]):
    """The recipe's records, with the chat template installed on ``tokenizer``; a record whose kind is not one of ``kinds``
    is refused: "stage: S {trains_on}, but FILE:LINE is a K row; {fix(K)}"."""
    from ftune.data.pipeline import load_records
    from ftune.data.templates import install_chat_template

    install_chat_template(tokenizer, recipe.data)
    records = load_records(recipe.data, CAUSAL_LM)
    for split in ("train", "eval"):
        other = next((r for r in getattr(records, split) if r.kind not in kinds), None)
        if other is not None:
            raise FtuneError(f"data.{split}.{other.source}: stage: {recipe.stage} {trains_on}, but {other.origin} is a {other.kind} row; "
                             f"{fix(other.kind)}")
    return records


def describe_rows(first_line: str, notes: list[str]) -> str:
    """A stage's "Data: ..." line with its notes below it, indented."""
    return "\n".join([first_line, *(f"  {note}" for note in notes)])
