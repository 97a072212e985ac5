"""Tool-calling data through the CLI on the tiny Llama: preview shows the tool turns and marks the calls as
trained, a template that drops tools is refused naming chatml-tools (exit 2, no traceback), and a run's
held-out tool conversations come back from RUN/heldout.jsonl so eval reports the tool-call metrics."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ftune.cli import app
from tests.conftest import write_jsonl
from tests.unit.test_data_tools import OPENAI, SHAREGPT, TOOLS

runner = CliRunner()
HELD_OUT_CITIES = ("Paris", "Oslo", "Rome")


def held_out_chat(city: str) -> dict:
    """OPENAI's conversation asking about ``city``: the reference call is get_weather(city, unit=celsius)."""
    call = {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city, "unit": "celsius"})}}
    return OPENAI | {"messages": [{"role": "user", "content": f"Warm in {city}?"},
                                  {"role": "assistant", "content": None, "tool_calls": [call]}, *OPENAI["messages"][2:]]}


# Replies put in the models' mouths for the held-out prompts, and what each scores against the reference call.
CANNED = {
    "tuned": {
        # key order and spacing differ from the reference: the arguments compare as parsed JSON
        "Paris": '<tool_call>\n{"arguments": {"unit": "celsius", "city": "Paris"}, "name": "get_weather"}\n</tool_call>',
        # a bare JSON call with its arguments as a JSON string, as OpenAI writes them
        "Oslo": json.dumps({"name": "get_weather", "arguments": json.dumps({"city": "Oslo", "unit": "celsius"})}),
        "Rome": '<tool_call>\n{"name": "get_forecast", "arguments": {"city": "Rome", "unit": "celsius"}}\n</tool_call>',  # unknown function
    },
    "base": {
        # the right function with the wrong city: valid, not exact
        "Paris": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>',
        "Oslo": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"</tool_call>',  # cut off: does not parse
        "Rome": "It is sunny in Rome.",  # no call attempted
    },
}
# (attempted, valid, exact) per city, in HELD_OUT_CITIES order
CANNED_SCORES = {"tuned": [(True, 1.0, 1.0), (True, 1.0, 1.0), (True, 0.0, 0.0)],
                 "base": [(True, 1.0, 0.0), (True, 0.0, 0.0), (False, 0.0, 0.0)]}
# Over the 3 prompts: rate = attempts / 3, valid = valid / attempts, exact = exact / 3.
CANNED_METRICS = {"tuned": {"tool_call_samples": 3, "tool_call_rate": 1.0, "tool_call_valid": 2 / 3, "tool_call_exact": 2 / 3},
                  "base": {"tool_call_samples": 3, "tool_call_rate": 2 / 3, "tool_call_valid": 1 / 2, "tool_call_exact": 0.0}}


@pytest.fixture
def tool_recipe(make_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("FTUNE_CACHE_DIR", str(tmp_path / "cache"))
    train = write_jsonl(tmp_path / "tools.jsonl", [SHAREGPT] * 4)
    held = write_jsonl(tmp_path / "tools-eval.jsonl", [held_out_chat(city) for city in HELD_OUT_CITIES])

    def make(**data):
        return make_recipe(data={"train": str(train), "eval": str(held), "max_length": 512, "chat_template": "chatml-tools", **data},
                           evaluation={"max_new_tokens": 4, "batch_size": 8})

    return make


def test_preview_shows_tool_turns_and_trains_only_the_calls_and_answers(tool_recipe):
    result = runner.invoke(app, ["data", "preview", str(tool_recipe()), "-n", "1"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "<tools>" in out and '"name": "get_weather"' in out
    assert '[[<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call><|im_end|>]]' in out
    assert '<|im_start|>tool\n{"temperature": 21}<|im_end|>' in out  # shown, outside the trained brackets
    assert "tools: 4 train conversations call tools" in out


def test_a_template_without_tools_is_refused_naming_the_option(tool_recipe):
    result = runner.invoke(app, ["data", "preview", str(tool_recipe(chat_template=None))])
    assert result.exit_code == 2
    assert "set data.chat_template: chatml-tools" in result.stderr and "Traceback" not in result.output


def test_held_out_tool_chats_round_trip_and_eval_scores_calls(tool_recipe, tmp_path, monkeypatch):
    import dataclasses

    import ftune.generation

    recipe = tool_recipe()
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    stored = [json.loads(line) for line in (tmp_path / "run" / "heldout.jsonl").read_text().splitlines()]
    assert [row["value"][0]["content"] for row in stored] == [f"Warm in {city}?" for city in HELD_OUT_CITIES]
    assert stored[0]["tools"][0]["function"]["name"] == "get_weather" and stored[0]["value"][2]["role"] == "tool"

    # The models generate for real; their replies to the tool-call prompts are then swapped for canned ones whose
    # scores are known. eval scores the tuned model first, then the base.
    real, scored = ftune.generation.generate_replies, []

    def canned(model, tokenizer, prompts, **options):
        replies = real(model, tokenizer, prompts, **options)
        if any(prompt[-1]["role"] != "user" for prompt in prompts):
            return replies  # the text answers after the tool result
        label = ("tuned", "base")[len(scored)]
        scored.append([prompt[-1]["content"] for prompt in prompts])
        cities = [prompt[-1]["content"].removeprefix("Warm in ").removesuffix("?") for prompt in prompts]
        return [dataclasses.replace(reply, text=CANNED[label][city]) for reply, city in zip(replies, cities)]

    monkeypatch.setattr(ftune.generation, "generate_replies", canned)
    result = runner.invoke(app, ["eval", str(tmp_path / "run"), "--base"])
    assert result.exit_code == 0, result.output
    assert scored == [[f"Warm in {city}?" for city in HELD_OUT_CITIES]] * 2
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    for label, expected in CANNED_METRICS.items():
        assert {k: metrics[label][k] for k in expected} == pytest.approx(expected), label
    assert {k: metrics["delta"][k] for k in ("tool_call_rate", "tool_call_valid", "tool_call_exact")} == pytest.approx(
        {"tool_call_rate": 1 / 3, "tool_call_valid": 2 / 3 - 1 / 2, "tool_call_exact": 2 / 3})
    rows = [json.loads(line) for line in (tmp_path / "run" / "eval" / "predictions.jsonl").read_text().splitlines()]
    for label in ("tuned", "base"):
        calls = [row for row in rows if row["model"] == label and "tool_call_exact" in row]
        assert [row["prediction"] for row in calls] == [CANNED[label][city] for city in HELD_OUT_CITIES]
        assert [(row["tool_call_attempted"], row["tool_call_valid"], row["tool_call_exact"]) for row in calls] == CANNED_SCORES[label]
    assert "tool_call_exact" in result.stdout


def test_generate_offers_the_recipe_tools_or_a_tools_file(tool_recipe, tmp_path, monkeypatch):
    import ftune.inference

    recipe = tool_recipe(train=[{"path": str(tmp_path / "tools.jsonl"), "tools": TOOLS}])
    assert runner.invoke(app, ["train", str(recipe), "--set", "training.max_steps=1"]).exit_code == 0
    rendered = []
    real = ftune.inference.stream_reply

    def spy(model, tokenizer, messages, *, tools=None, **options):
        rendered.append(tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True))
        return real(model, tokenizer, messages, tools=tools, **options)

    monkeypatch.setattr(ftune.inference, "stream_reply", spy)
    run = str(tmp_path / "run")
    assert runner.invoke(app, ["generate", run, "--prompt", "Warm in Oslo?", "--max-new-tokens", "2"]).exit_code == 0
    assert "<tools>" in rendered[-1] and '"get_weather"' in rendered[-1]  # the recipe's tools, by default
    other = tmp_path / "other-tools.json"
    other.write_text(json.dumps([{"name": "convert_units", "parameters": {"type": "object", "properties": {}}}]))
    assert runner.invoke(app, ["generate", run, "--prompt", "2 km in miles?", "--tools", str(other), "--max-new-tokens", "2"]).exit_code == 0
    assert '"convert_units"' in rendered[-1] and '"get_weather"' not in rendered[-1]
    for bad, named in ((tmp_path / "missing.json", "no such file"), (write_bad(tmp_path / "bad.json", "[{"), "not valid JSON"),
                       (write_bad(tmp_path / "nameless.json", '[{"parameters": {}}]'), "needs a function name")):
        result = runner.invoke(app, ["generate", run, "--prompt", "hi", "--tools", str(bad)])
        assert result.exit_code == 2 and f"--tools {bad}" in result.stderr and named in result.stderr, result.output
        assert "Traceback" not in result.output


def write_bad(path, text):
    path.write_text(text)
    return path
