"""Tokenization and masking, token by token on the tiny tokenizer: every assistant turn and its end-of-turn
token are trained, nothing else is (unless train_on_prompt); text trains every token; length limits count."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from ftune.data import build_datasets, load_records, tokenize_splits
from ftune.data.formats import Record
from ftune.data.templates import install_chat_template
from ftune.data.tokenize import IGNORE_INDEX, tokenize_records
from ftune.errors import FtuneError
from ftune.recipe.data import DataConfig
from tests.conftest import TOKENIZER_DIR, write_jsonl

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "blue moon"},
]


@pytest.fixture
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def tokenize(tokenizer, records, **options):
    options = {"max_length": 256, **options}
    examples, stats = tokenize_records(tokenizer, records, **options)
    return examples, stats


def chat(messages, origin="test:1"):
    return Record("chat", messages, origin, 0)


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_multi_turn_trains_each_assistant_turn_and_its_end_token_only(tokenizer):
    [example], stats = tokenize(tokenizer, [chat(CONVERSATION)])
    ids, labels = example["input_ids"], example["labels"]
    assert ids == encode(tokenizer, tokenizer.apply_chat_template(CONVERSATION, tokenize=False))
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in trained)
    turn_1 = encode(tokenizer, "red<|im_end|>")
    turn_2 = encode(tokenizer, "blue moon<|im_end|>")
    assert [ids[i] for i in trained] == turn_1 + turn_2
    # Each turn is one contiguous run, preceded by the assistant header and followed by the masked newline.
    runs = [trained[: len(turn_1)], trained[len(turn_1):]]
    for run in runs:
        assert run == list(range(run[0], run[-1] + 1))
        assert ids[run[-1]] == tokenizer.eos_token_id
        assert labels[run[0] - 1] == IGNORE_INDEX and labels[run[-1] + 1] == IGNORE_INDEX
        assert tokenizer.decode(ids[: run[0]]).endswith("<|im_start|>assistant\n")
    assert stats.trained_tokens == len(turn_1) + len(turn_2) and stats.missing_eos == 0


def test_sharegpt_and_messages_rows_mask_identically(tokenizer, tmp_path):
    sharegpt = {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
                                  for m in CONVERSATION]}
    messages = {"messages": CONVERSATION}
    held = write_jsonl(tmp_path / "held.jsonl", [{"instruction": "x", "output": "y"}])
    examples = []
    for name, row in (("s", sharegpt), ("m", messages)):
        config = DataConfig(train=str(write_jsonl(tmp_path / f"{name}.jsonl", [row])), eval=str(held))
        examples.append(tokenize_splits(load_records(config), tokenizer, config).train[0])
    assert examples[0] == examples[1]


def test_train_on_prompt_trains_every_token(tokenizer):
    [example], stats = tokenize(tokenizer, [chat(CONVERSATION)], train_on_prompt=True)
    assert example["labels"] == example["input_ids"] and stats.trained_tokens == len(example["input_ids"]) - 1


def test_text_rows_train_every_token_and_end_with_eos(tokenizer):
    [example], _ = tokenize(tokenizer, [Record("text", "the model learns this text", "t:1", 0)])
    assert example["input_ids"] == encode(tokenizer, "the model learns this text") + [tokenizer.eos_token_id]
    assert example["labels"] == example["input_ids"]


def test_classification_rows_keep_one_class_id(tokenizer):
    [example], stats = tokenize(tokenizer, [Record("classification", ["good film", 1], "c:1", 0)])
    assert example == {"input_ids": encode(tokenizer, "good film"), "labels": 1}
    assert stats.trained_tokens == 0 and stats.tokens == len(example["input_ids"])


def test_truncate_counts_and_cuts_drop_counts_and_removes(tokenizer):
    long_answer = chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 40}])
    short = chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])
    examples, stats = tokenize(tokenizer, [long_answer, short], max_length=20)
    assert stats.truncated == 1 and len(examples[0]["input_ids"]) == 20 and len(examples) == 2
    examples, stats = tokenize(tokenizer, [long_answer, short], max_length=20, truncation="drop")
    assert stats.dropped_too_long == 1 and len(examples) == 1 and examples[0]["labels"][-2] != IGNORE_INDEX


def test_truncation_that_cuts_the_whole_response_drops_the_example(tokenizer):
    prompt_heavy = chat([{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}])
    examples, stats = tokenize(tokenizer, [prompt_heavy], max_length=16)
    assert len(examples) == 0 and stats.dropped_no_target == 1


def test_named_template_installs_and_masks(tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(FtuneError, match="set data.chat_template: chatml"):
        tokenize(tokenizer, [chat(CONVERSATION[1:3])])
    install_chat_template(tokenizer, DataConfig(train="data/quickstart/train.jsonl", chat_template="alpaca"))
    [example], _ = tokenize(tokenizer, [chat(CONVERSATION[1:3])])
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert trained == encode(tokenizer, "red<|im_end|>")  # alpaca template: response + EOS, nothing of the prompt
    assert "### Instruction:\nName a colour." in tokenizer.decode(example["input_ids"])


def test_inline_template_that_rejects_a_row_is_a_row_problem(tokenizer, tmp_path):
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system messages') }}{% endif %}"
                "{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    rows = [{"instruction": "a", "output": "b", "system": "s"}, {"instruction": "c", "output": "d"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    held = write_jsonl(tmp_path / "h.jsonl", [{"instruction": "x", "output": "y"}])
    config = DataConfig(train=str(path), eval=str(held), chat_template=template, cache=False)
    with pytest.raises(FtuneError) as info:
        build_datasets(config, tokenizer)
    assert "t.jsonl:1: the chat template rejects this conversation: no system messages" in info.value.problems[0]
    splits = build_datasets(config.model_copy(update={"on_error": "skip"}), tokenizer)
    assert len(splits.train) == 1 and splits.train_stats.rejected == 1


def test_template_without_eos_is_reported(tokenizer):
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    _, stats = tokenize(tokenizer, [chat(CONVERSATION[1:3])], train_on_prompt=True)
    assert stats.missing_eos == 1
