"""Eval on tool-calling held-out chats: with generation replaced by known replies, the share of well-formed calls
to known functions and the exact-match rate of name + arguments (compared as parsed JSON) have known values."""

from __future__ import annotations

import copy

import pytest

from ftune.data.formats import Record
from ftune.data.templates import read_chat_template
from ftune.generation import Reply
from ftune.evaluate import score_generation
from ftune.recipe.loader import validate_recipe
from tests.conftest import recipe_dict
from tests.unit.test_data_tools import EXPECTED, TOOLS

CALLS = {  # user question -> the model's reply to it
    "Paris?": '<tool_call>\n{"arguments": {"unit": "celsius", "city": "Paris"}, "name": "get_weather"}\n</tool_call>',  # exact
    "Oslo?": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bergen", "unit": "celsius"}}\n</tool_call>',  # wrong city
    "Rome?": '<tool_call>\n{"name": "get_weather", "arguments": {"city": Rome}}\n</tool_call>',  # not JSON
    "Lima?": '<tool_call>\n{"name": "get_forecast", "arguments": {"city": "Lima", "unit": "celsius"}}\n</tool_call>',  # unknown name
    "Kyiv?": "I cannot check the weather.",  # no call attempted
}


def conversation(question: str) -> list[dict]:
    messages = copy.deepcopy(EXPECTED)
    messages[0]["content"] = question
    messages[1]["tool_calls"][0]["function"]["arguments"]["city"] = question.rstrip("?")
    messages[3]["content"] = f"It is 21 degrees in {question.rstrip('?')}."
    return messages


def test_tool_call_scores_with_known_replies(tiny_llama_dir, alpaca_files, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ftune.generation

    seen_tools = []

    def replies(model, tok, prompts, tools=None, **kw):
        seen_tools.extend(tools)
        return [Reply(CALLS[p[-1]["content"]] if p[-1]["role"] == "user" else "It is 21 degrees in Paris.", True) for p in prompts]

    monkeypatch.setattr(ftune.generation, "generate_replies", replies)
    recipe = validate_recipe(recipe_dict(tiny_llama_dir, *alpaca_files, tmp_path / "run", data={"max_length": 256}))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.chat_template = read_chat_template("chatml-tools")
    records = [Record("chat", conversation(q), f"row {i}", 0, TOOLS) for i, q in enumerate(CALLS)]
    metrics, rows = score_generation(model, tokenizer, records, recipe)
    assert metrics["tool_call_rate"] == pytest.approx(4 / 5)  # all but Kyiv try to call
    assert metrics["tool_call_valid"] == pytest.approx(2 / 4)  # of those attempts, Paris and Oslo parse and name get_weather
    assert metrics["tool_call_exact"] == pytest.approx(1 / 5)  # only Paris has the reference arguments
    assert metrics["tool_call_samples"] == 5 and metrics["samples"] == 10
    assert metrics["exact_match"] == pytest.approx(1 / 5)  # the final answers: only Paris's says Paris
    assert seen_tools == [TOOLS] * 10  # both the answer and the call prompts were rendered with the schemas
    calls = [row for row in rows if "tool_call_exact" in row]
    assert [row["tool_call_exact"] for row in calls] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert [row["tool_call_attempted"] for row in calls] == [True, True, True, True, False]
    assert calls[0]["prompt"] == "Paris?" and '"city": "Paris"' in calls[0]["reference"]
