"""Row formats and bad rows: each format becomes the right record, auto-detection picks the one format the
columns identify, and every bad row is reported with its file:line and field (or skipped on request)."""

from __future__ import annotations

import json

import pytest

from ftune.data import build_datasets, load_records
from ftune.errors import FtuneError
from ftune.recipe.data import DataConfig
from tests.conftest import TOKENIZER_DIR, write_jsonl

HELD_OUT = {
    "alpaca": {"instruction": "held", "output": "out"},
    "text": {"text": "held out text"},
    "classification": {"text": "held out", "label": "neg"},
}


def records(tmp_path, rows, *, task="causal_lm", eval_row=None, **entry):
    """Training records of ``rows`` (one entry with ``entry`` options) and the problems-free eval file."""
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    held = write_jsonl(tmp_path / "eval.jsonl", [eval_row or HELD_OUT["alpaca"]])
    config = DataConfig(train=[{"path": str(path), **entry}], eval=[{"path": str(held), **{k: v for k, v in entry.items() if k != "columns"}}])
    return load_records(config, task).train


def problems_of(tmp_path, rows, **kwargs) -> list[str]:
    with pytest.raises(FtuneError) as info:
        records(tmp_path, rows, **kwargs)
    return info.value.problems


def test_alpaca_with_system_and_input_becomes_three_messages(tmp_path):
    [record] = records(tmp_path, [{"instruction": "Add", "input": "2+2", "output": "4", "system": "Be brief."}])
    assert record.kind == "chat"
    assert record.value == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add\n\n2+2"},
        {"role": "assistant", "content": "4"},
    ]
    assert record.origin.endswith("train.jsonl:1")


def test_columns_mapping_renames_differently_named_columns_and_auto_detects(tmp_path):
    [record] = records(tmp_path, [{"question": "Q?", "answer": "A."}], columns={"instruction": "question", "output": "answer"})
    assert record.value == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]


def test_sharegpt_speaker_names_map_to_roles(tmp_path):
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "H1"}, {"from": "gpt", "value": "G1"},
                             {"from": "human", "value": "H2"}, {"from": "gpt", "value": "G2"}]}
    [record] = records(tmp_path, [row])
    assert [m["role"] for m in record.value] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in record.value] == ["S", "H1", "G1", "H2", "G2"]


def test_messages_multi_turn_and_recipe_system_prompt(tmp_path):
    row = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    path = write_jsonl(tmp_path / "m.jsonl", [row, {"messages": [{"role": "user", "content": "v"}, {"role": "assistant", "content": "b"}]}])
    config = DataConfig(train=str(path), eval_split=1, system_prompt="SYS")
    loaded = load_records(config)
    assert all(r.value[0] == {"role": "system", "content": "SYS"} for r in loaded.train + loaded.eval)


def test_text_rows_and_classification_rows_are_told_apart_by_task(tmp_path):
    rows = [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"}]
    [causal, _] = records(tmp_path, rows, eval_row=HELD_OUT["text"])
    assert causal.kind == "text" and causal.value == "good film"
    classified = records(tmp_path, rows, task="classification", eval_row=HELD_OUT["classification"])
    assert [r.value for r in classified] == [["good film", 1], ["bad film", 0]]  # names sorted: neg=0, pos=1


def test_recipe_labels_fix_ids_and_unknown_labels_are_row_problems(tmp_path):
    rows = [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}, {"text": "c", "label": 0}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    config = DataConfig(train=str(path), eval_split=0.5, labels=["pos", "neg"])
    with pytest.raises(FtuneError) as info:
        load_records(config, "classification")
    assert any("c.jsonl:2: field 'label' value 'meh' is not one of the labels (pos, neg)" in p for p in info.value.problems)
    skipped = load_records(config.model_copy(update={"on_error": "skip"}), "classification")
    assert skipped.label_names == ["pos", "neg"]
    assert sorted(r.value[1] for r in skipped.train + skipped.eval) == [0, 0]  # "pos" and class id 0


def test_preference_rows_parse_but_train_only_with_stage_dpo(tmp_path):
    rows = [{"prompt": "p", "chosen": "good", "rejected": "bad"}]
    [record] = records(tmp_path, rows, eval_row={"prompt": "q", "chosen": "x", "rejected": "y"})
    assert record.kind == "preference" and record.value["prompt"] == [{"role": "user", "content": "p"}]
    from transformers import AutoTokenizer

    path = write_jsonl(tmp_path / "pref.jsonl", rows + [{"prompt": "q", "chosen": "x", "rejected": "y"}])
    with pytest.raises(FtuneError, match="preference rows \(chosen/rejected\) train with stage: dpo"):
        build_datasets(DataConfig(train=str(path), eval_split=1), AutoTokenizer.from_pretrained(TOKENIZER_DIR))


def test_ambiguous_or_unknown_columns_ask_for_format(tmp_path):
    [problem] = problems_of(tmp_path, [{"prompt": "x", "completion": "y"}])
    assert problem.startswith("data.train.0.format: cannot tell the format") and "columns: (expected" in problem


def test_mapped_column_missing_from_the_file_names_the_entry_key(tmp_path):
    [problem] = problems_of(tmp_path, [{"q": "x", "output": "y"}], columns={"instruction": "question"})
    assert problem.startswith("data.train.0.columns.instruction: column 'question' is not in") and "(columns: output, q)" in problem


def test_explicit_format_without_its_column_names_the_entry(tmp_path):
    [problem] = problems_of(tmp_path, [{"instruction": "x", "answer": "y"}], format="alpaca")
    assert problem.startswith("data.train.0: format alpaca needs column 'output'") and "columns: {output: <your column>}" in problem


BAD_ROWS = [
    ('{"instruction": "a", "output": ', "train.jsonl:1: not valid JSON"),
    ('{"instruction": "a"}', "train.jsonl:2: field 'output' is missing"),
    ('{"instruction": "a", "output": null}', "train.jsonl:3: field 'output' is null"),
    ('{"instruction": "a", "output": "  "}', "train.jsonl:4: field 'output' is empty"),
    ('{"instruction": 7, "output": "b"}', "train.jsonl:5: field 'instruction' must be a string, got int"),
    ('["not", "an", "object"]', "train.jsonl:6: a row must be a JSON object, got list"),
]


def test_every_bad_row_is_reported_with_line_and_field(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(line for line, _ in BAD_ROWS) + '\n{"instruction": "ok", "output": "fine"}\n')
    config = DataConfig(train=str(path), eval=[str(write_jsonl(tmp_path / "e.jsonl", [HELD_OUT["alpaca"]]))])
    with pytest.raises(FtuneError) as info:
        load_records(config)
    problems = info.value.problems
    for _, expected in BAD_ROWS:
        assert any(expected in problem for problem in problems), expected
    assert len(problems) == len(BAD_ROWS) + 1
    assert problems[-1] == "fix these rows, or set data.on_error: skip to train without them"
    skipped = load_records(config.model_copy(update={"on_error": "skip"}))
    assert [r.value[-1]["content"] for r in skipped.train] == ["fine"]
    assert skipped.notes[0].startswith(f"skipped {len(BAD_ROWS)} bad rows (data.on_error: skip)")


def test_non_string_message_content_names_the_nested_field(tmp_path):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["x"]}]}
    [problem, _] = problems_of(tmp_path, [row])
    assert problem.endswith("train.jsonl:1: field 'messages[1].content' must be a string, got list")


def test_mapped_column_names_appear_in_row_problems(tmp_path):
    [problem, _] = problems_of(tmp_path, [{"question": "q", "answer": ""}], columns={"instruction": "question", "output": "answer"})
    assert problem.endswith("train.jsonl:1: field 'answer' is empty")


def test_at_most_ten_problems_are_listed(tmp_path):
    problems = problems_of(tmp_path, [{"instruction": "a", "output": ""}] * 25 + [{"instruction": "a", "output": "b"}])
    assert len(problems) == 12 and problems[10] == "... and 15 more bad rows"


def test_identical_chosen_and_rejected_is_a_bad_preference_row(tmp_path):
    [problem, _] = problems_of(tmp_path, [{"prompt": "p", "chosen": "same", "rejected": "same"}],
                               eval_row={"prompt": "q", "chosen": "x", "rejected": "y"})
    assert "train.jsonl:1: field 'rejected' is identical to 'chosen'" in problem


def test_schema_rejects_classification_rows_for_causal_lm_and_bad_columns_keys(tmp_path, make_recipe):
    from ftune.recipe import load_recipe

    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": "x"}])
    recipe = make_recipe(data={"train": [{"path": str(path), "format": "classification"}], "eval": [], "eval_split": 0.5})
    with pytest.raises(FtuneError, match=r"data.train.0.format: classification rows need task: classification"):
        load_recipe(recipe)
    recipe = make_recipe(data={"train": [{"path": str(path), "format": "text", "columns": {"label": "x"}}]})
    with pytest.raises(FtuneError, match=r"data.train.0.columns \(line \d+\): 'label' is not a field of format text"):
        load_recipe(recipe)
    assert json.loads(json.dumps(DataConfig(train=str(path), eval_split=3).eval_split)) == 3
