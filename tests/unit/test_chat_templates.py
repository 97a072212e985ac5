"""The shipped chat templates against llama.cpp's own implementations of the same layouts, and each family's
tokenizer: the replies that training masks in end on the family's end-of-turn token, and generation stops on it.

tests/assets/chat-template-reference.json is llama.cpp's rendering (scripts/make_chat_template_reference.py);
with the llamacpp extra installed it is re-rendered here, so the file cannot drift from what llama.cpp does.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from transformers import AutoTokenizer

from ftune.data.formats import Record
from ftune.data.templates import check_chat_template, end_of_turn_ids, install_chat_template, read_chat_template
from ftune.data.tokenize import IGNORE_INDEX, tokenize_records
from ftune.errors import FtuneError
from ftune.families import CHAT_LAYOUTS, FAMILIES
from ftune.generation import generation_options
from ftune.recipe.data import DataConfig, chat_template_names
from tests.conftest import ASSETS, REPO, TOKENIZER_DIR
from tests.unit.test_families import DECODERS, family_tokenizer, save_family_model

REFERENCE = json.loads((ASSETS / "chat-template-reference.json").read_text(encoding="utf-8"))["layouts"]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "blue moon"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def test_every_layout_has_a_template_and_a_reference_and_every_family_names_one():
    assert set(CHAT_LAYOUTS) <= set(chat_template_names())
    assert set(CHAT_LAYOUTS) == set(REFERENCE)
    assert {f.chat_template for f in FAMILIES.values() if f.chat_template} <= set(CHAT_LAYOUTS)


@pytest.mark.parametrize("name", sorted(CHAT_LAYOUTS))
def test_each_shipped_layout_renders_as_llama_cpp_does(tokenizer, name):
    reference = REFERENCE[name]
    tokenizer.chat_template = read_chat_template(name)
    # llama.cpp writes no BOS (its tokenizer adds it) and spells the family's EOS out.
    context = {"bos_token": "", "eos_token": reference["eos"] or tokenizer.eos_token}
    for title, row in reference["conversations"].items():
        full = tokenizer.apply_chat_template(row["messages"], tokenize=False, **context)
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True, **context)
        assert (full, prompt) == (row["full"], row["prompt"]), f"{name}, {title}"


def test_the_reference_file_is_what_llama_cpp_renders_now():
    pytest.importorskip("llama_cpp", reason="needs the llamacpp extra: pip install 'ftune[llamacpp]'")
    spec = importlib.util.spec_from_file_location("reference", REPO / "scripts" / "make_chat_template_reference.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.reference() == REFERENCE


@pytest.mark.parametrize("model_type", DECODERS)
def test_each_family_trains_its_replies_through_the_end_of_turn_and_stops_there(model_type):
    tokenizer = family_tokenizer(model_type)
    name = FAMILIES[model_type].chat_template
    if name is None:  # base-model families ship no layout: the recipe must name one
        assert end_of_turn_ids(tokenizer) == [tokenizer.eos_token_id]
        with pytest.raises(FtuneError, match="has no chat template.*set data.chat_template: chatml"):
            check_chat_template(tokenizer)
        return
    marker = CHAT_LAYOUTS[name].end_of_turn or tokenizer.eos_token
    marker_id = tokenizer.convert_tokens_to_ids(marker)
    assert marker_id in end_of_turn_ids(tokenizer)
    [example], stats = tokenize_records(tokenizer, [Record("chat", CONVERSATION, "test:1", 0)], max_length=256)
    trained = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])
    # Both replies, each closed by the marker, and nothing of the prompts (some layouts put a space before a reply).
    assert trained.replace(" ", "") == f"red{marker}bluemoon{marker}".replace(" ", ""), trained
    assert stats.missing_eos == 0
    assert marker_id in generation_options(tokenizer, max_new_tokens=4)["eos_token_id"]


def test_a_layout_whose_markers_the_vocabulary_lacks_is_refused(tokenizer):
    config = DataConfig(train="data/quickstart/train.jsonl", chat_template="gemma")
    with pytest.raises(FtuneError, match=r"data.chat_template: gemma needs <start_of_turn>, <end_of_turn> as single tokens.*chatml"):
        install_chat_template(tokenizer, config)


def test_a_family_model_without_a_template_is_pointed_at_its_own_layout(tmp_path):
    folder = save_family_model("gemma2", tmp_path / "gemma2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = None
    with pytest.raises(FtuneError, match="set data.chat_template: gemma "):
        check_chat_template(tokenizer)
