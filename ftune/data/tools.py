"""Tool calling: tool schemas, the calls an assistant turn makes, and the calls a model's reply contains.

Every layout is normalised to the form ``tokenizer.apply_chat_template(messages, tools=...)``
expects: schemas as ``{"type": "function", "function": {name, description, parameters}}``, an
assistant turn's calls as ``tool_calls: [{"type": "function", "function": {name, arguments}}]``
with ``arguments`` a parsed JSON object (OpenAI ships them as a JSON string), and results as
``role: tool`` turns. Parsing a reply reads the ``<tool_call>`` JSON blocks the built-in
``chatml-tools`` template (and Hermes/Qwen-style templates) write, or a reply that is bare JSON.
"""

from __future__ import annotations

import json
import re

# Markers of the template probe (``template_renders_tools``), chosen so no real output contains them by accident.
PROBE_DESCRIPTION = "ftune-probe-schema-description"
PROBE_ARGUMENT = "ftune-probe-argument-value"
PROBE_RESULT = "ftune-probe-tool-result"
TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


class ToolError(ValueError):
    """A malformed schema or call; the message completes "field 'X' ..."."""


def tool_schema(value: object) -> dict:
    """One schema in the chat-template form; a bare ``{name, parameters}`` function is wrapped."""
    if not isinstance(value, dict):
        raise ToolError(f"must be a tool schema object, got {type(value).__name__}")
    function = value.get("function", value) if value.get("type", "function") == "function" else None
    if not isinstance(function, dict):
        raise ToolError(f"has type {value.get('type')!r}; only function tools are supported")
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ToolError("needs a function name (a non-empty string under 'name')")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise ToolError(f"'{name}' parameters must be a JSON schema object, got {type(parameters).__name__}")
    out = {"name": name, "description": function.get("description", ""), "parameters": parameters}
    if not isinstance(out["description"], str):
        raise ToolError(f"'{name}' description must be a string")
    return {"type": "function", "function": out}


def tool_schemas(value: object) -> list[dict]:
    """A list of schemas from a list, or from a JSON string holding one (LLaMA-Factory's ``tools`` column)."""
    if isinstance(value, str):
        if not value.strip():
            return []
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ToolError(f"is not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise ToolError(f"must be a list of tool schemas, got {type(value).__name__}")
    schemas = []
    for index, item in enumerate(value):
        try:
            schemas.append(tool_schema(item))
        except ToolError as exc:
            raise ToolError(f"[{index}] {exc}") from exc
    names = [s["function"]["name"] for s in schemas]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ToolError(f"names function '{duplicate}' twice")
    return schemas


def tool_call(value: object) -> dict:
    """One call in the chat-template form from an OpenAI ``{type, function: {name, arguments}}`` or a bare
    ``{name, arguments}`` object; arguments given as a JSON string are parsed."""
    if not isinstance(value, dict):
        raise ToolError(f"must be a call object {{name, arguments}}, got {type(value).__name__}")
    function = value.get("function", value)
    if not isinstance(function, dict):
        raise ToolError("'function' must be an object with name and arguments")
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ToolError("needs a function name (a non-empty string under 'name')")
    arguments = function.get("arguments", function.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise ToolError(f"arguments of '{name}' are not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(arguments, dict):
        raise ToolError(f"arguments of '{name}' must be a JSON object, got {type(arguments).__name__}")
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if isinstance(value.get("id"), str):
        call["id"] = value["id"]  # some templates (Mistral) pair results with calls by id
    return call


def tool_calls_of_text(text: str) -> list[dict]:
    """The calls a ShareGPT ``function_call`` turn holds: one JSON call object, or a list of them."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ToolError(f"is not a valid JSON call ({exc.msg} at column {exc.colno})") from exc
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise ToolError("holds no call")
    return [tool_call(call) for call in calls]


def has_tool_turns(messages: list[dict]) -> bool:
    return any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def attempts_call(text: str) -> bool:
    """Whether a generated reply tries to call a tool (a ``<tool_call>`` block, or a bare JSON object/list),
    well-formed or not: the denominator of ``tool_call_valid``."""
    return bool(TOOL_CALL_BLOCK.search(text)) or text.strip().startswith(("{", "["))


def parse_reply_calls(text: str) -> list[dict] | None:
    """The calls in a generated reply as ``[{name, arguments}]``, or None when it holds no parsable call.

    ``<tool_call>`` blocks are read first; without them the whole reply may be one JSON call. A call
    whose JSON does not parse, or that lacks a name, makes the reply invalid (None).
    """
    blocks = TOOL_CALL_BLOCK.findall(text)
    if not blocks:
        stripped = text.strip()
        if not stripped.startswith(("{", "[")):
            return None
        blocks = [stripped]
    calls = []
    for block in blocks:
        try:
            value = json.loads(block)
        except json.JSONDecodeError:
            return None
        for item in value if isinstance(value, list) else [value]:
            try:
                call = tool_call(item)
            except ToolError:
                return None
            calls.append({"name": call["function"]["name"], "arguments": call["function"]["arguments"]})
    return calls or None


def reference_calls(message: dict) -> list[dict]:
    return [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in message.get("tool_calls", ())]


def template_renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template shows tool schemas, call arguments and tool results at all.

    Many templates (SmolLM2's among them) silently drop ``tools=``, ``tool_calls`` and tool turns; a
    model trained through them would learn nothing about tools, so that is refused up front.
    """
    schema = {"type": "function", "function": {"name": "probe_lookup", "description": PROBE_DESCRIPTION,
                                               "parameters": {"type": "object", "properties": {"key": {"type": "string"}}}}}
    messages = [
        {"role": "user", "content": "probe"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "probe_lookup", "arguments": {"key": PROBE_ARGUMENT}}}]},
        {"role": "tool", "content": PROBE_RESULT},
        {"role": "assistant", "content": "done"},
    ]
    try:
        text = tokenizer.apply_chat_template(messages, tools=[schema], tokenize=False)
    except Exception:  # a template that raises on tool turns cannot render them either
        return False
    return all(marker in text for marker in (PROBE_DESCRIPTION, PROBE_ARGUMENT, PROBE_RESULT))
