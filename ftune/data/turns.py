"""Row fields and chat turns: the checks every row format shares, each failure a ``RowError`` naming the field.

Turn lists are read in both speaker conventions (ShareGPT ``from``/``value``, OpenAI ``role``/``content``);
tool calls and tool results are normalised to the chat-template form here (see ``ftune.data.tools``),
so every format that holds conversations accepts them the same way.
"""

from __future__ import annotations

import json

from ftune.data.tools import ToolError, tool_call, tool_calls_of_text, tool_schemas

ROLES = ("system", "user", "assistant", "tool")
CALL = "function_call"  # the ShareGPT speaker whose value is a JSON call; it becomes an assistant turn with tool_calls
# ShareGPT speaker names seen in the wild -> chat roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                  CALL: CALL, "observation": "tool", "tool": "tool", "function": "tool"}
MESSAGE_ROLES = {role: role for role in ROLES}


class RowError(ValueError):
    """A problem with one field of one row; the caller names the row's origin and the user's column name."""

    def __init__(self, field: str, problem: str, detail: str = "") -> None:
        super().__init__(problem)
        self.field, self.problem, self.detail = field, problem, detail

    def describe(self, columns: dict[str, str]) -> str:
        return f"field '{columns.get(self.field, self.field)}{self.detail}' {self.problem}"


def text_field(row: dict, name: str, *, required: bool = True, allow_empty: bool = False) -> str:
    value = row.get(name)
    if value is None:
        if required:
            raise RowError(name, "is missing" if name not in row else "is null")
        return ""
    if not isinstance(value, str):
        raise RowError(name, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(name, "is empty")
    return value


def turn_text(turn: dict, field: str, key: str, index: int, *, allow_empty: bool) -> str:
    try:
        return text_field(turn, key, allow_empty=allow_empty)
    except RowError as exc:
        raise RowError(field, exc.problem, f"[{index}].{key}") from exc


def tool_result(turn: dict, field: str, key: str, index: int) -> dict:
    """A ``role: tool`` turn; a result given as a JSON value rather than text is kept as its JSON text."""
    content = turn.get(key)
    if isinstance(content, (dict, list, int, float, bool)):
        content = json.dumps(content, ensure_ascii=False)
    message = {"role": "tool", "content": turn_text({key: content}, field, key, index, allow_empty=True)}
    for extra in ("name", "tool_call_id"):
        if isinstance(turn.get(extra), str):
            message[extra] = turn[extra]  # some templates label results with the function or the call id
    return message


def assistant_calls(turn: dict, field: str, key: str, index: int) -> dict:
    """An OpenAI-style assistant turn with ``tool_calls`` (its text may be empty or null)."""
    calls = turn["tool_calls"]
    if not isinstance(calls, list) or not calls:
        raise RowError(field, "must be a non-empty list of {function: {name, arguments}} calls", f"[{index}].tool_calls")
    parsed = []
    for number, call in enumerate(calls):
        try:
            parsed.append(tool_call(call))
        except ToolError as exc:
            raise RowError(field, str(exc), f"[{index}].tool_calls[{number}]") from exc
    content = turn_text(turn, field, key, index, allow_empty=True) if turn.get(key) is not None else ""
    return {"role": "assistant", "content": content, "tool_calls": parsed}


def chat_turns(row: dict, field: str, role_key: str, content_key: str, role_names: dict[str, str], *, learn: bool = True) -> list[dict]:
    turns = row.get(field)
    if turns is None:
        raise RowError(field, "is missing" if field not in row else "is null")
    if not isinstance(turns, list) or not turns:
        raise RowError(field, f"must be a non-empty list of {{{role_key}, {content_key}}} objects")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(field, f"must be an object with {role_key} and {content_key}", f"[{index}]")
        role = role_names.get(turn.get(role_key)) if isinstance(turn.get(role_key), str) else None
        if role is None:
            raise RowError(field, f"must be one of {', '.join(role_names)}, got {turn.get(role_key)!r}", f"[{index}].{role_key}")
        if role == CALL:
            try:
                calls = tool_calls_of_text(turn_text(turn, field, content_key, index, allow_empty=False))
            except ToolError as exc:
                raise RowError(field, str(exc), f"[{index}].{content_key}") from exc
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        elif role == "tool":
            messages.append(tool_result(turn, field, content_key, index))
        elif role == "assistant" and turn.get("tool_calls") is not None:
            messages.append(assistant_calls(turn, field, content_key, index))
        else:
            content = turn_text(turn, field, content_key, index, allow_empty=role == "system")
            messages.append({"role": role, "content": content})
    if learn and not any(m["role"] == "assistant" for m in messages):
        raise RowError(field, "has no assistant turn to learn from")
    return messages


def row_tools(row: dict, default: list[dict] | None) -> list[dict] | None:
    """The row's ``tools`` column (a list or a JSON string of one), else the entry's ``tools:``."""
    value = row.get("tools")
    if value is None or value == "" or value == []:
        return default
    try:
        return tool_schemas(value) or default
    except ToolError as exc:
        raise RowError("tools", str(exc)) from exc


def check_called_names(messages: list[dict], tools: list[dict] | None) -> None:
    if not tools:
        return
    known = [tool["function"]["name"] for tool in tools]
    for message in messages:
        for call in message.get("tool_calls", ()):
            if call["function"]["name"] not in known:
                raise RowError("tools", f"has no function '{call['function']['name']}', which the conversation calls "
                               f"(tools: {', '.join(known)})")


def with_system(row: dict, messages: list[dict]) -> list[dict]:
    system = text_field(row, "system", required=False, allow_empty=True)
    if system.strip() and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}, *messages]
    return messages
