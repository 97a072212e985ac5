"""Preference rows in the layouts peers use (LLaMA-Factory's ShareGPT history + chosen/rejected messages, TRL's
strings, explicit and implicit message lists) become one (prompt, chosen, rejected) triple; KTO rows in every layout
(TRL's, LLaMA-Factory's messages/conversations + label/kto_tag, alpaca + label) one labelled completion; columns no
format reads are named; a bad preference row names its file:line and field."""

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


KTO_RECORD = {"prompt": PROMPT, "completion": "Hello there!", "label": False}
USER, REPLY = {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hello there!"}
KTO_LAYOUTS = {
    "trl prompt/completion/label": {"prompt": "Say hi.", "system": "Be kind.", "completion": "Hello there!", "label": False},
    "sharegpt + kto_tag": {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hello there!"}],
                           "system": "Be kind.", "kto_tag": False},
    "llamafactory messages + label": {"messages": [PROMPT[0], USER, REPLY], "label": False},
    "messages + kto_tag": {"messages": [PROMPT[0], USER, REPLY], "kto_tag": False},
    "sharegpt + label": {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Say hi."},
                                           {"from": "gpt", "value": "Hello there!"}], "label": False},
    "alpaca + label": {"instruction": "Say hi.", "input": "", "output": "Hello there!", "system": "Be kind.", "label": False},
    "alpaca + CSV-style label": {"instruction": "Say hi.", "output": "Hello there!", "system": "Be kind.", "label": "FALSE"},
}
KTO_HELD = {"prompt": "q", "completion": "x", "label": True}


@pytest.mark.parametrize("layout", KTO_LAYOUTS)
def test_every_kto_layout_yields_the_same_labelled_completion(tmp_path, layout):
    [record] = load(tmp_path, [KTO_LAYOUTS[layout]])
    assert record.kind == "kto" and record.value == KTO_RECORD
    path = write_jsonl(tmp_path / "kto.jsonl", [KTO_LAYOUTS[layout]])
    [record] = rows_to_records(read_rows(str(path)), "causal_lm")  # ftune eval --split FILE reads them alike
    assert record.kind == "kto" and record.value == KTO_RECORD


def test_a_mapped_column_labels_chat_rows_and_a_bad_label_names_its_line(tmp_path):
    rows = [{"messages": [USER, REPLY], "good": True}, {"messages": [USER, REPLY], "good": "maybe"}]
    with pytest.raises(FtuneError) as info:
        load(tmp_path, rows, format="messages", columns={"kto_tag": "good"})
    assert info.value.problems[0].split("/")[-1] == "pref.jsonl:2: field 'good' must be true (desirable) or false (undesirable), got 'maybe'"
    [record] = load(tmp_path, rows[:1], format="messages", columns={"kto_tag": "good"})
    assert record.kind == "kto" and record.value["label"] is True


def test_a_label_on_a_reply_that_is_not_the_last_turn_is_refused(tmp_path):
    with pytest.raises(FtuneError) as info:
        load(tmp_path, [{"messages": [USER, REPLY, USER], "label": True}])
    assert "pref.jsonl:1: field 'label' labels the last reply, but the conversation does not end" in info.value.problems[0]


def test_columns_no_format_reads_are_named_in_a_note(tmp_path):
    rows = [{"messages": [USER, REPLY], "label": "greeting", "score": 0.9, "source": "web"}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    held = write_jsonl(tmp_path / "held.jsonl", [{**rows[0], "messages": [USER, {"role": "assistant", "content": "Hi."}]}])
    records = load_records(DataConfig(train=str(path), eval=str(held)))
    assert records.train[0].kind == "chat"  # a label of other values labels no completion
    [note, _] = [n for n in records.notes if "does not read" in n]
    assert note.startswith(f"data.train.0: {path} has columns 'label', 'score', 'source' that format messages does not read")
    assert "score: no stage trains on a score" in note and "label holds no true/false value" in note


@pytest.mark.parametrize("layout", ["trl prompt/completion/label", "sharegpt + kto_tag", "llamafactory messages + label"])
def test_a_label_a_format_reads_is_not_named_unused(tmp_path, layout):
    path = write_jsonl(tmp_path / "kto.jsonl", [KTO_LAYOUTS[layout]])
    records = load_records(DataConfig(train=str(path), eval=str(write_jsonl(tmp_path / "held.jsonl", [KTO_HELD]))))
    assert not [note for note in records.notes if "does not read" in note]
    text = write_jsonl(tmp_path / "sentiment.jsonl", [{"text": "great", "label": "pos"}, {"text": "bad", "label": "neg"}])
    assert not [note for note in load_records(DataConfig(train=str(text), eval_split=1), "classification").notes if "does not read" in note]


def test_chosen_rejected_columns_under_a_chat_format_are_refused(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "p"}, {"from": "gpt", "value": "c"}], "chosen": "a", "rejected": "b"}]
    with pytest.raises(FtuneError, match="data.train.0.format: .* has chosen/rejected columns, which format sharegpt does not read"):
        load(tmp_path, rows, format="sharegpt")
