"""Preference rows in the layouts peers use (LLaMA-Factory's ShareGPT history + chosen/rejected messages, TRL's
strings, explicit and implicit message lists) become one (prompt, chosen, rejected) triple; KTO rows are
recognised and refused with the reason; a bad preference row names its file:line and field."""

from __future__ import annotations

import pytest

from ftune.data import load_records
from ftune.data.formats import rows_to_records
from ftune.data.sources import read_rows
from ftune.errors import FtuneError
from ftune.recipe.data import DataConfig
from tests.conftest import write_jsonl

PROMPT = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hi."}]
TRIPLE = {"prompt": PROMPT, "chosen": "Hello there!", "rejected": "Go away."}
LAYOUTS = {
    "sharegpt history + message objects": {
        "conversations": [{"from": "human", "value": "Say hi."}], "system": "Be kind.",
        "chosen": {"from": "gpt", "value": "Hello there!"}, "rejected": {"from": "gpt", "value": "Go away."}},
    "prompt/chosen/rejected strings": {"prompt": "Say hi.", "system": "Be kind.", "chosen": "Hello there!", "rejected": "Go away."},
    "explicit message lists": {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "Hello there!"}],
                               "rejected": [{"role": "assistant", "content": "Go away."}]},
    "implicit prompt in message lists": {"chosen": [*PROMPT, {"role": "assistant", "content": "Hello there!"}],
                                         "rejected": [*PROMPT, {"role": "assistant", "content": "Go away."}]},
    "role/content message objects": {"prompt": PROMPT, "chosen": {"role": "assistant", "content": "Hello there!"},
                                     "rejected": {"role": "assistant", "content": "Go away."}},
}
HELD = {"prompt": "q", "chosen": "x", "rejected": "y"}


def load(tmp_path, rows, **entry):
    path = write_jsonl(tmp_path / "pref.jsonl", rows)
    held = write_jsonl(tmp_path / "held.jsonl", [HELD])
    return load_records(DataConfig(train=[{"path": str(path), **entry}], eval=str(held))).train


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_preference_layout_yields_the_same_triple(tmp_path, layout):
    [record] = load(tmp_path, [LAYOUTS[layout]])
    assert record.kind == "preference" and record.value == TRIPLE


def test_one_off_files_read_the_same_layouts(tmp_path):
    path = write_jsonl(tmp_path / "pref.jsonl", [LAYOUTS["sharegpt history + message objects"]])
    [record] = rows_to_records(read_rows(str(path)), "causal_lm")
    assert record.value == TRIPLE


BAD_ROWS = [
    ({"prompt": "p", "chosen": {"from": "human", "value": "x"}, "rejected": "y"},
     "pref.jsonl:1: field 'chosen.from' must be the assistant's reply, got a message from 'human'"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]},
     "pref.jsonl:2: field 'rejected' has other turns before the reply than 'chosen'"),
    ({"chosen": "x", "rejected": "y"}, "pref.jsonl:3: field 'prompt' is missing; give it, or chosen/rejected as message lists"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "more"}], "rejected": "y"},
     "pref.jsonl:4: field 'chosen[1]' must end with the assistant's reply"),
    ({"prompt": "p", "chosen": {"role": "assistant", "content": "same"}, "rejected": "same"},
     "pref.jsonl:5: field 'rejected' is identical to 'chosen'"),
]


def test_bad_preference_rows_name_the_line_and_field(tmp_path):
    with pytest.raises(FtuneError) as info:
        load(tmp_path, [row for row, _ in BAD_ROWS] + [HELD | {"prompt": "ok"}])
    for _, expected in BAD_ROWS:
        assert any(expected in problem for problem in info.value.problems), (expected, info.value.problems)


@pytest.mark.parametrize("row, label", [
    ({"prompt": "p", "completion": "c", "label": True}, "label"),
    ({"conversations": [{"from": "human", "value": "p"}, {"from": "gpt", "value": "c"}], "kto_tag": False}, "kto_tag"),
])
def test_kto_rows_are_recognised_and_refused_with_the_reason(tmp_path, row, label):
    with pytest.raises(FtuneError) as info:
        load(tmp_path, [row])
    [problem] = info.value.problems
    assert problem.startswith("data.train.0.format: ") and f"holds KTO rows (one completion with a boolean {label})" in problem
    assert "no ftune stage trains on yet" in problem and "chosen/rejected rows (format: preference)" in problem
    path = write_jsonl(tmp_path / "kto.jsonl", [row])
    with pytest.raises(FtuneError, match="--split.format: .* holds KTO rows"):
        rows_to_records(read_rows(str(path)), "causal_lm")
