"""Train/eval splits: a fixed seed gives the same split whatever the file order or hash seed; duplicates
between train and eval are removed from eval and reported."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ftune.data import load_records
from ftune.errors import FtuneError
from ftune.recipe.data import DataConfig
from tests.conftest import REPO, write_jsonl

ROWS = [{"instruction": "repeat", "input": str(i), "output": str(i)} for i in range(40)]


def split_outputs(path, **options) -> tuple[list[str], list[str]]:
    loaded = load_records(DataConfig(train=str(path), **options))
    return [r.value[-1]["content"] for r in loaded.train], [r.value[-1]["content"] for r in loaded.eval]


def test_fraction_split_is_seeded_and_ignores_file_order(tmp_path):
    train, evaluation = split_outputs(write_jsonl(tmp_path / "a.jsonl", ROWS), eval_split=0.25)
    assert len(evaluation) == 10 and len(train) == 30 and not set(train) & set(evaluation)
    shuffled = write_jsonl(tmp_path / "b.jsonl", ROWS[::-1])
    assert sorted(split_outputs(shuffled, eval_split=0.25)[1]) == sorted(evaluation)
    assert sorted(split_outputs(shuffled, eval_split=0.25, seed=1)[1]) != sorted(evaluation)


def test_count_split_holds_out_that_many_rows(tmp_path):
    train, evaluation = split_outputs(write_jsonl(tmp_path / "a.jsonl", ROWS), eval_split=7)
    assert len(evaluation) == 7 and len(train) == 33


def test_split_does_not_depend_on_python_hash_seed(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    code = (f"from ftune.data import load_records; from ftune.recipe.data import DataConfig\n"
            f"print(sorted(r.origin for r in load_records(DataConfig(train={str(path)!r}, eval_split=0.2)).eval))")
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                       env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1 and "a.jsonl" in outputs.pop()


def test_duplicates_of_a_held_out_row_stay_out_of_train(tmp_path):
    rows = ROWS + [ROWS[0]] * 5
    for seed in range(10):
        train, evaluation = split_outputs(write_jsonl(tmp_path / "a.jsonl", rows), eval_split=0.5, seed=seed)
        assert not set(train) & set(evaluation)


def test_eval_rows_duplicating_train_rows_are_removed_and_reported(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [ROWS[3], {"instruction": "new", "output": "x"}, ROWS[5]])
    loaded = load_records(DataConfig(train=str(train), eval=str(evaluation)))
    assert [r.value[-1]["content"] for r in loaded.eval] == ["x"]
    [note] = loaded.notes
    assert note.startswith("eval: removed 2 rows that also appear in train (exact duplicates), e.g. ") and "eval.jsonl:1" in note


def test_eval_made_only_of_train_rows_is_an_error(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(FtuneError, match="data.eval: all 2 eval rows also appear in the training data"):
        load_records(DataConfig(train=str(train), eval=str(write_jsonl(tmp_path / "eval.jsonl", ROWS[:2]))))


def test_split_that_leaves_nothing_to_train_on_names_the_key(tmp_path):
    with pytest.raises(FtuneError, match="data.eval_split: holding out 40 of 40 distinct training rows"):
        split_outputs(write_jsonl(tmp_path / "a.jsonl", ROWS), eval_split=40)


def test_eval_split_rejects_fractions_of_one_or_more():
    with pytest.raises(ValueError, match="a fraction must be in"):
        DataConfig(train="data/quickstart/train.jsonl", eval_split=1.5)
