"""Tool-calling chats: the three layouts people have become one record, render exactly as the template's own
``apply_chat_template(messages, tools=...)``, train the calls and answers but never the tool results or user
turns, round-trip through the built-in template and RUN/heldout.jsonl, and bad rows name file:line and field."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from ftune.data import load_records
from ftune.data.heldout import heldout_rows, records_of
from ftune.data.templates import read_chat_template
from ftune.data.tokenize import IGNORE_INDEX, tokenize_records
from ftune.data.tools import parse_reply_calls, template_renders_tools
from ftune.errors import FtuneError
from ftune.metrics import tool_call_exact, tool_call_valid
from ftune.recipe.data import DataConfig
from tests.conftest import TOKENIZER_DIR, write_jsonl

WEATHER = {"name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}, "required": ["city"]}}
TOOLS = [{"type": "function", "function": WEATHER}]
ARGS = {"city": "Paris", "unit": "celsius"}
RESULT = '{"temperature": 21}'
EXPECTED = [
    {"role": "user", "content": "How warm is it in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": ARGS}}]},
    {"role": "tool", "content": RESULT},
    {"role": "assistant", "content": "It is 21 degrees in Paris."},
]
SHAREGPT = {  # LLaMA-Factory's glaive_toolcall layout: tools as a JSON string, the call as a JSON string
    "conversations": [
        {"from": "human", "value": "How warm is it in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": ARGS})},
        {"from": "observation", "value": RESULT},
        {"from": "gpt", "value": "It is 21 degrees in Paris."},
    ],
    "tools": json.dumps([WEATHER]),
}
OPENAI = {  # OpenAI's layout: arguments as a JSON string, the result as a role: tool message
    "messages": [
        {"role": "user", "content": "How warm is it in Paris?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": json.dumps(ARGS)}}]},
        {"role": "tool", "content": RESULT},
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
    ],
    "tools": TOOLS,
}
# A model's own template that supports tools (the Hermes layout most tool-tuned models use), unlike the tiny one.
OWN_TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}"
    "{% for c in m['tool_calls'] or [] %}<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def tokenizer():
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.chat_template = read_chat_template("chatml-tools")
    return tok


def load(tmp_path, row, **entry):
    path = write_jsonl(tmp_path / "train.jsonl", [row])
    held = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": "held", "output": "out"}])
    return load_records(DataConfig(train=[{"path": str(path), **entry}], eval=str(held))).train


def layouts(tmp_path):
    plain = {"messages": OPENAI["messages"]}
    return {"sharegpt": load(tmp_path, SHAREGPT), "messages": load(tmp_path, OPENAI), "entry tools": load(tmp_path, plain, tools=[WEATHER])}


def test_every_layout_becomes_the_same_record(tmp_path):
    for name, [record] in layouts(tmp_path).items():
        assert record.kind == "chat" and record.value == EXPECTED and record.tools == TOOLS, name


@pytest.mark.parametrize("template", ["chatml-tools", OWN_TOOL_TEMPLATE])
def test_every_layout_tokenizes_as_the_templates_own_rendering(tmp_path, template):
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.chat_template = read_chat_template(template)
    expected = tok(tok.apply_chat_template(EXPECTED, tools=TOOLS, tokenize=False), add_special_tokens=False)["input_ids"]
    assert "get_weather" in tok.decode(expected) and RESULT in tok.decode(expected)
    for name, records in layouts(tmp_path).items():
        [example], _ = tokenize_records(tok, records, max_length=512)
        assert example["input_ids"] == expected, name


def test_the_call_and_the_answer_are_trained_the_tool_result_and_user_turn_are_not(tmp_path, tokenizer):
    [record] = load(tmp_path, SHAREGPT)
    [example], _ = tokenize_records(tokenizer, [record], max_length=512)
    ids, labels = example["input_ids"], example["labels"]
    trained = [ids[i] for i, label in enumerate(labels) if label != IGNORE_INDEX]
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call><|im_end|>'
    answer = "It is 21 degrees in Paris.<|im_end|>"
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert trained == encode(call) + encode(answer)
    masked = tokenizer.decode([i for i, label in zip(ids, labels) if label == IGNORE_INDEX])
    assert RESULT in masked and "How warm is it in Paris?" in masked and "<tools>" in masked


def test_train_on_prompt_renders_the_tools_too(tmp_path, tokenizer):
    [record] = load(tmp_path, OPENAI)
    [example], _ = tokenize_records(tokenizer, [record], max_length=512, train_on_prompt=True)
    assert example["labels"] == example["input_ids"] and "get_weather" in tokenizer.decode(example["input_ids"])


def test_the_builtin_tool_template_round_trips_a_call(tokenizer):
    calls = [{"name": "get_weather", "arguments": {"unit": "kelvin", "city": "Zürich"}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "Checking.", "tool_calls": [{"type": "function", "function": c} for c in calls]}]
    prompt = tokenizer.apply_chat_template(messages[:1], tools=TOOLS, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    assert full.startswith(prompt)
    reply = full[len(prompt):].removesuffix("<|im_end|>\n")
    assert parse_reply_calls(reply) == calls
    assert tool_call_exact(parse_reply_calls(reply), calls) == 1.0 and tool_call_valid(parse_reply_calls(reply), {"get_weather"}) == 1.0


def test_reply_calls_compare_as_parsed_json():
    reference = [{"name": "convert_units", "arguments": {"value": 20, "from": "km", "to": "mi"}}]
    reordered = '<tool_call>\n{"arguments": {"to": "mi", "value": 20.0, "from": "km"}, "name": "convert_units"}\n</tool_call>'
    assert tool_call_exact(parse_reply_calls(reordered), reference) == 1.0
    assert tool_call_exact(parse_reply_calls(reordered.replace("20.0", "21")), reference) == 0.0
    assert parse_reply_calls('<tool_call>{"name": "convert_units", "arguments": {"value": 2</tool_call>') is None
    assert tool_call_valid(parse_reply_calls('{"name": "fly", "arguments": {}}'), {"convert_units"}) == 0.0
    assert parse_reply_calls("It is 21 degrees.") is None and tool_call_valid(None, {"convert_units"}) == 0.0


def test_tool_records_round_trip_through_heldout_rows(tmp_path):
    [record] = load(tmp_path, SHAREGPT)
    rows = json.loads(json.dumps(heldout_rows([record])))  # as RUN/heldout.jsonl stores them
    assert records_of(rows) == [record]
    assert records_of([{"kind": "chat", "value": EXPECTED[:1], "origin": "old:1", "source": 0}])[0].tools is None  # older runs


def test_a_template_that_drops_tools_is_refused_naming_chatml_tools(tmp_path):
    plain = AutoTokenizer.from_pretrained(TOKENIZER_DIR)  # its template ignores tools=, tool_calls and tool turns
    assert not template_renders_tools(plain)
    with pytest.raises(FtuneError, match=r"does not render tool schemas.*set data.chat_template: chatml-tools"):
        tokenize_records(plain, load(tmp_path, SHAREGPT), max_length=512)


BAD_TOOL_ROWS = [
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": Paris}'}}]}]},
     "train.jsonl:1: field 'messages[1].tool_calls[0]' arguments of 'get_weather' are not valid JSON"),
    ({"conversations": [{"from": "human", "value": "u"}, {"from": "function_call", "value": "get_weather(Paris)"}]},
     "train.jsonl:2: field 'conversations[1].value' is not a valid JSON call"),
    ({"conversations": [{"from": "human", "value": "u"}, {"from": "robot", "value": "x"}]},
     "train.jsonl:3: field 'conversations[1].from' must be one of system, human, user, gpt"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "function", "content": "x"}]},
     "train.jsonl:4: field 'messages[1].role' must be one of system, user, assistant, tool, got 'function'"),
    ({"conversations": [{"from": "human", "value": "u"}, {"from": "function_call", "value": '{"name": "fly", "arguments": {}}'}],
      "tools": json.dumps([WEATHER])},
     "train.jsonl:5: field 'tools' has no function 'fly', which the conversation calls (tools: get_weather)"),
    ({"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}], "tools": "[{"},
     "train.jsonl:6: field 'tools' is not valid JSON"),
]


def test_malformed_calls_and_unknown_roles_name_the_row_and_field(tmp_path):
    files = []
    for layout in ("messages", "conversations"):  # one file per layout, so each is auto-detected
        lines = [json.dumps(row) if layout in row else "" for row, _ in BAD_TOOL_ROWS]  # blank lines keep the line numbers
        (tmp_path / layout).mkdir()
        path = tmp_path / layout / "train.jsonl"
        path.write_text("\n".join(lines) + "\n" + json.dumps(SHAREGPT if layout == "conversations" else OPENAI) + "\n")
        files.append(str(path))
    held = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": "held", "output": "out"}])
    with pytest.raises(FtuneError) as info:
        load_records(DataConfig(train=files, eval=str(held)))
    problems = info.value.problems
    for _, expected in BAD_TOOL_ROWS:
        assert any(expected in problem for problem in problems), (expected, problems)
    assert len(problems) == len(BAD_TOOL_ROWS) + 1


def test_entry_tools_are_validated_in_the_recipe(tmp_path, make_recipe):
    from ftune.recipe import load_recipe

    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": OPENAI["messages"]}])
    recipe = make_recipe(data={"train": [{"path": str(path), "tools": [{"description": "no name"}]}]})
    with pytest.raises(FtuneError, match=r"data.train.0.tools.0.function.name"):
        load_recipe(recipe)
    recipe = make_recipe(data={"train": [{"path": str(path), "format": "text", "tools": [WEATHER]}]})
    with pytest.raises(FtuneError, match=r"tools only apply to formats sharegpt, messages"):
        load_recipe(recipe)
    recipe = make_recipe(data={"train": [{"path": str(path), "tools": [WEATHER, WEATHER]}]})
    with pytest.raises(FtuneError, match=r"function 'get_weather' is listed twice"):
        load_recipe(recipe)
    loaded = load_recipe(make_recipe(data={"train": [{"path": str(path), "tools": [WEATHER]}]}))
    assert loaded.data.train[0].tools[0].model_dump() == TOOLS[0]


def test_entry_tools_on_rows_detected_as_another_format_name_the_key(tmp_path):
    with pytest.raises(FtuneError, match=r"data.train.0.tools: .* holds alpaca rows, which have no tool turns"):
        load(tmp_path, {"instruction": "i", "output": "o"}, tools=[WEATHER])


def test_offered_tools_need_a_template_that_renders_them(tmp_path):
    from transformers import AutoTokenizer

    from ftune.inference import offered_tools

    schemas = tmp_path / "tools.json"
    schemas.write_text(json.dumps(TOOLS))
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.chat_template = read_chat_template("chatml-tools")
    assert offered_tools(schemas, None, tokenizer) == TOOLS
    tokenizer.chat_template = read_chat_template("chatml")  # drops tools
    with pytest.raises(FtuneError, match="drops tool schemas.*chatml-tools"):
        offered_tools(schemas, None, tokenizer)
