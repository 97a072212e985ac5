"""Data sources: JSONL/JSON/CSV/Parquet files and directories read the same rows; missing, unreadable and
offline sources are errors naming the recipe entry; mixing weights and sample counts are seeded."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from ftune.data import load_records
from ftune.data.sources import read_source
from ftune.errors import FtuneError
from ftune.recipe.data import DatasetSource, DataConfig
from tests.conftest import write_jsonl

ROWS = [{"instruction": f"say {w}", "output": w} for w in ("red", "blue", "green", "cat")]


def write_as(path, rows):
    if path.suffix == ".jsonl":
        return write_jsonl(path, rows)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        lines = ["instruction,output"] + [f'"{r["instruction"]}",{r["output"]}' for r in rows]
        path.write_text("\n".join(lines) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_type_reads_the_same_rows(tmp_path, suffix):
    path = write_as(tmp_path / f"rows{suffix}", ROWS)
    rows = read_source(DatasetSource(path=str(path)), [], key="data.train.0")
    assert [r.fields for r in rows] == ROWS
    expected_origin = {".jsonl": "rows.jsonl:1", ".json": "rows.json[row 0]", ".csv": "rows.csv:2", ".parquet": "rows.parquet[row 0]"}[suffix]
    assert rows[0].origin.endswith(expected_origin)


def test_a_directory_reads_its_files_in_name_order(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_as(folder / "b.csv", ROWS[2:])
    write_as(folder / "a.parquet", ROWS[:2])
    (folder / "notes.txt").write_text("ignored")
    config = DataConfig(train=str(folder), eval_split=1)
    loaded = load_records(config)
    assert sorted(r.value[-1]["content"] for r in loaded.train + loaded.eval) == sorted(r["output"] for r in ROWS)
    origins = [r.origin for r in read_source(config.train[0], [], key="data.train.0")]
    assert origins[0].endswith("a.parquet[row 0]") and origins[-1].endswith("b.csv:3")


def test_csv_row_with_extra_cells_is_a_row_problem(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("instruction,output\na,b\nc,d,e\n")
    problems: list[str] = []
    rows = read_source(DatasetSource(path=str(path)), problems, key="data.train.0")
    assert len(rows) == 1 and problems[0].endswith("bad.csv:3: the row has more cells than the header has columns")


def test_a_file_removed_after_validation_names_the_entry(tmp_path):
    keep, gone = write_jsonl(tmp_path / "a.jsonl", ROWS), write_jsonl(tmp_path / "b.jsonl", ROWS)
    config = DataConfig(train=[str(keep), str(gone)], eval_split=1)
    gone.unlink()
    with pytest.raises(FtuneError, match=r"^data.train.1.path: .*b.jsonl does not exist"):
        load_records(config)


def test_an_unreadable_file_names_the_entry(tmp_path):
    good = write_jsonl(tmp_path / "a.jsonl", ROWS)
    broken = tmp_path / "b.parquet"
    broken.write_bytes(b"this is not parquet")
    with pytest.raises(FtuneError, match=r"^data.train.1.path: cannot read .*b.parquet as parquet"):
        load_records(DataConfig(train=[str(good), str(broken)], eval_split=1))
    binary = tmp_path / "c.jsonl"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(FtuneError, match=r"^data.train.1.path: .*c.jsonl:1: not UTF-8 text \(byte 0xff"):
        load_records(DataConfig(train=[str(good), str(binary)], eval_split=1))


def test_hub_dataset_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = DataConfig(train=[{"hub": "someorg/some-dataset", "config": "main", "split": "train[:10]"}])
    with pytest.raises(FtuneError) as info:
        load_records(config)
    [problem] = info.value.problems
    assert problem.startswith("data.train.0.hub: cannot load 'someorg/some-dataset' (config main, split train[:10])")
    assert "needs network access" in problem


def test_source_needs_exactly_one_of_path_and_hub(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        DatasetSource(path=str(write_jsonl(tmp_path / "a.jsonl", ROWS)), hub="org/name")
    with pytest.raises(ValueError, match="only apply to hub datasets"):
        DatasetSource(path=str(tmp_path / "a.jsonl"), split="train")


def mixed(tmp_path, seed=42, order=None, **entries):
    """Training rows (outputs) after mixing two files with the given per-entry options."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": f"a{i}"} for i in (order or range(10))])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "b", "output": f"b{i}"} for i in range(4)])
    held = write_jsonl(tmp_path / "held.jsonl", [{"instruction": "h", "output": "h"}])
    config = DataConfig(train=[{"path": str(a), **entries.get("a", {})}, {"path": str(b), **entries.get("b", {})}], eval=str(held), seed=seed)
    loaded = load_records(config)
    return [r.value[-1]["content"] for r in loaded.train], loaded.notes


def test_weights_repeat_or_subsample_each_dataset(tmp_path):
    rows, notes = mixed(tmp_path, a={"weight": 0.5}, b={"weight": 2})
    counts = Counter(r[0] for r in rows)
    assert counts == {"a": 5, "b": 8}
    assert all(n == 2 for r, n in Counter(rows).items() if r.startswith("b"))  # every b row exactly twice
    assert len({r for r in rows if r.startswith("a")}) == 5  # a half, no repeats
    assert any("data.train.1" in note and "4 rows -> 8 (weight 2)" in note for note in notes)


def test_samples_fixes_the_row_count_repeating_whole_passes_first(tmp_path):
    rows, _ = mixed(tmp_path, b={"samples": 10})
    b_rows = Counter(r for r in rows if r.startswith("b"))
    assert sum(b_rows.values()) == 10 and sorted(b_rows.values()) == [2, 2, 3, 3]


def test_mixing_is_seeded_and_independent_of_file_order(tmp_path):
    first, _ = mixed(tmp_path, a={"weight": 0.3})
    again, _ = mixed(tmp_path, a={"weight": 0.3})
    reordered, _ = mixed(tmp_path, a={"weight": 0.3}, order=[9, 3, 1, 0, 7, 5, 2, 8, 6, 4])
    other_seed, _ = mixed(tmp_path, seed=7, a={"weight": 0.3})
    picked = lambda rows: sorted(r for r in rows if r.startswith("a"))  # noqa: E731
    assert first == again and picked(first) == picked(reordered)
    assert picked(first) != picked(other_seed)
