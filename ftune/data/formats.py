"""Row formats: each turns one raw row into a conversation (a list of role/content messages).

``FORMATS`` is the dispatch table; ``detect_format`` picks one from the keys of the first row when
the recipe says ``auto``. Every check names the row's file:line and the field at fault.
"""

from __future__ import annotations

from typing import Callable

from ftune.data.sources import Row
from ftune.errors import FtuneError, raise_problems

ROLES = ("system", "user", "assistant")


class RowError(ValueError):
    """A problem with one row; the caller adds the row's origin."""


def _text_field(row: dict, name: str, *, required: bool = True, allow_empty: bool = False) -> str:
    if name not in row or row[name] is None:
        if required:
            raise RowError(f"field '{name}' is missing")
        return ""
    value = row[name]
    if not isinstance(value, str):
        raise RowError(f"field '{name}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(f"field '{name}' is empty")
    return value


def alpaca_to_messages(row: dict) -> list[dict]:
    instruction = _text_field(row, "instruction")
    extra = _text_field(row, "input", required=False, allow_empty=True)
    output = _text_field(row, "output")
    system = _text_field(row, "system", required=False, allow_empty=True)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "system", "content": system}] if system.strip() else []
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def messages_to_messages(row: dict) -> list[dict]:
    messages = row.get("messages")
    if messages is None:
        raise RowError("field 'messages' is missing")
    if not isinstance(messages, list) or not messages:
        raise RowError("field 'messages' must be a non-empty list of {role, content} objects")
    result = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RowError(f"field 'messages[{index}]' must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise RowError(f"field 'messages[{index}].role' must be one of {', '.join(ROLES)}, got {role!r}")
        try:
            content = _text_field(message, "content")
        except RowError as exc:
            raise RowError(str(exc).replace("'content'", f"'messages[{index}].content'")) from None
        result.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in result):
        raise RowError("field 'messages' has no assistant turn to learn from")
    return result


FORMATS: dict[str, tuple[frozenset[str], Callable[[dict], list[dict]]]] = {
    # name -> (keys that identify it, converter)
    "alpaca": (frozenset({"instruction", "output"}), alpaca_to_messages),
    "messages": (frozenset({"messages"}), messages_to_messages),
}


def detect_format(row: Row) -> str:
    matches = [name for name, (keys, _) in FORMATS.items() if keys <= row.fields.keys()]
    if len(matches) != 1:
        found = ", ".join(sorted(row.fields)) or "none"
        raise FtuneError(
            f"{row.origin}: cannot tell the data format from the keys ({found}); "
            f"set format: to one of {', '.join(FORMATS)} in the recipe's data entry"
        )
    return matches[0]


def rows_to_conversations(rows: list[Row], format_name: str, *, system_prompt: str | None = None) -> list[list[dict]]:
    name = detect_format(rows[0]) if format_name == "auto" else format_name
    convert = FORMATS[name][1]
    conversations, problems = [], []
    for row in rows:
        try:
            messages = convert(row.fields)
        except RowError as exc:
            problems.append(f"{row.origin}: {exc}")
            continue
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}] + messages
        conversations.append(messages)
    raise_problems(problems)
    return conversations
