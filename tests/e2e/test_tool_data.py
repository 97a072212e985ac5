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


@pytest.fixture
def tool_recipe(make_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("FTUNE_CACHE_DIR", str(tmp_path / "cache"))
    train = write_jsonl(tmp_path / "tools.jsonl", [SHAREGPT] * 4)
    held = write_jsonl(tmp_path / "tools-eval.jsonl", [OPENAI | {"messages": [{**OPENAI["messages"][0], "content": "Warm in Paris?"},
                                                                              *OPENAI["messages"][1:]]}])

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


def test_held_out_tool_chats_round_trip_and_eval_scores_calls(tool_recipe, tmp_path):
    recipe = tool_recipe()
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    stored = [json.loads(line) for line in (tmp_path / "run" / "heldout.jsonl").read_text().splitlines()]
    assert stored[0]["tools"][0]["function"]["name"] == "get_weather" and stored[0]["value"][2]["role"] == "tool"
    result = runner.invoke(app, ["eval", str(tmp_path / "run"), "--base"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    for model in ("tuned", "base"):
        assert metrics[model]["tool_call_samples"] == 1 and 0 <= metrics[model]["tool_call_exact"] <= metrics[model]["tool_call_valid"] <= 1
    assert "tool_call_exact" in result.stdout and "tool_call_exact" in metrics["delta"]


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
