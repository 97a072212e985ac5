"""Row formats: each turns one raw row into a record of one kind (chat, text, classification, preference).

Chat rows may call tools: ShareGPT ``function_call`` / ``observation`` turns and OpenAI-style
``tool_calls`` / ``role: tool`` messages both become the chat-template form (see ``ftune.data.tools``),
with the row's ``tools`` column, or the entry's ``tools:``, kept on the record for the template.
Preference rows in every layout become one (prompt messages, chosen, rejected) triple.

``FORMATS`` is the dispatch table: per format, the record kind it yields, the columns that identify
it when the recipe says ``format: auto``, the tasks it can serve, and its converter. A recipe's
``columns:`` mapping renames a dataset's columns to the format's fields before conversion, and
problems are reported under the user's column names, with the row's file:line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from ftune.data.sources import Row
from ftune.data.tools import ToolError, tool_call, tool_calls_of_text, tool_schemas
from ftune.errors import FtuneError, raise_problems
from ftune.recipe.tasks import CAUSAL_LM, CLASSIFICATION
from ftune.recipe.data import TOOL_FORMATS
from ftune.recipe.schema import FORMAT_FIELDS, DatasetSource

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


@dataclass(frozen=True)
class Record:
    kind: str  # "chat" | "text" | "classification" | "preference"
    value: object  # messages | text | [text, label] | {"prompt": messages, "chosen": str, "rejected": str}
    origin: str
    source: int  # index of the recipe entry in its split (mixing weights are per entry)
    tools: list[dict] | None = None  # chat: tool schemas for the template's tools= argument

    @property
    def content_key(self) -> str:
        """Canonical text of the record: equal for exact duplicates, whatever file or format they came from."""
        parts = [self.kind, self.value] + ([self.tools] if self.tools else [])
        return json.dumps(parts, sort_keys=True, ensure_ascii=False)


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


def alpaca_record(row: dict) -> list[dict]:
    instruction = text_field(row, "instruction")
    extra = text_field(row, "input", required=False, allow_empty=True)
    output = text_field(row, "output")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return with_system(row, [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}])


def sharegpt_record(row: dict) -> list[dict]:
    return with_system(row, chat_turns(row, "conversations", "from", "value", SHAREGPT_ROLES))


def messages_record(row: dict) -> list[dict]:
    return chat_turns(row, "messages", "role", "content", MESSAGE_ROLES)


def text_record(row: dict) -> str:
    return text_field(row, "text")


def classification_record(row: dict) -> list:
    label = row.get("label")
    if label is None:
        raise RowError("label", "is missing" if "label" not in row else "is null")
    if isinstance(label, float) and label.is_integer():
        label = int(label)  # Parquet/pandas often store integer classes as floats
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise RowError("label", f"must be a class name or a class id, got {type(label).__name__}")
    if isinstance(label, str) and not label.strip():
        raise RowError("label", "is empty")
    return [text_field(row, "text"), label]


def response(row: dict, name: str) -> tuple[list[dict] | None, str]:
    """A preference response: a string, one message object (role/content or from/value), or a message list
    ending with the assistant's reply; a list's earlier turns are returned as the prompt it implies."""
    value = row.get(name)
    if isinstance(value, dict):
        role = value.get("role", value.get("from", "assistant"))
        if SHAREGPT_ROLES.get(role) != "assistant":
            raise RowError(name, f"must be the assistant's reply, got a message from {role!r}", ".role" if "role" in value else ".from")
        key = "content" if "content" in value or "value" not in value else "value"
        try:
            return None, text_field(value, key)
        except RowError as exc:
            raise RowError(name, exc.problem, f".{key}") from exc
    if isinstance(value, list):
        keys = ("from", "value") if value and isinstance(value[0], dict) and "from" in value[0] else ("role", "content")
        messages = chat_turns(row, name, *keys, SHAREGPT_ROLES if keys[0] == "from" else MESSAGE_ROLES)
        if messages[-1]["role"] != "assistant" or messages[-1].get("tool_calls"):
            raise RowError(name, "must end with the assistant's reply", f"[{len(messages) - 1}]")
        return messages[:-1], messages[-1]["content"]
    return None, text_field(row, name)


def preference_triple(row: dict, prompt: list[dict] | None) -> dict:
    (chosen_prefix, chosen), (rejected_prefix, rejected) = response(row, "chosen"), response(row, "rejected")
    implied = chosen_prefix or None
    if (rejected_prefix or None) != implied:
        raise RowError("rejected", "has other turns before the reply than 'chosen'; both must answer the same prompt")
    if prompt is None:
        if implied is None:
            raise RowError("prompt", ("is missing" if "prompt" not in row else "is null")
                           + "; give it, or chosen/rejected as message lists that start with the prompt")
        prompt = implied
    elif implied is not None and implied != prompt:
        raise RowError("chosen", "repeats prompt turns that differ from 'prompt'; give only the reply, or drop 'prompt'")
    if chosen.strip() == rejected.strip():
        raise RowError("rejected", "is identical to 'chosen'; a preference pair needs two different responses")
    return {"prompt": with_system(row, prompt), "chosen": chosen, "rejected": rejected}


def preference_record(row: dict) -> dict:
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        return preference_triple(row, chat_turns(row, "prompt", "role", "content", MESSAGE_ROLES, learn=False))
    if prompt is None:
        return preference_triple(row, None)
    return preference_triple(row, [{"role": "user", "content": text_field(row, "prompt")}])


def sharegpt_preference_record(row: dict) -> dict:
    return preference_triple(row, chat_turns(row, "conversations", "from", "value", SHAREGPT_ROLES, learn=False))


def kto_label(row: dict, name: str) -> bool:
    label = row.get(name)
    if not isinstance(label, bool):
        raise RowError(name, f"must be true (desirable) or false (undesirable), got {label!r}")
    return label


def kto_record(row: dict) -> dict:
    return {"prompt": [{"role": "user", "content": text_field(row, "prompt")}], "completion": text_field(row, "completion"),
            "label": kto_label(row, "label")}


def sharegpt_kto_record(row: dict) -> dict:
    messages = sharegpt_record(row)
    return {"prompt": messages[:-1], "completion": messages[-1]["content"], "label": kto_label(row, "kto_tag")}


@dataclass(frozen=True)
class Format:
    kind: str
    keys: frozenset[str]  # columns that must all be present; they identify the format for auto-detection
    tasks: frozenset[str]
    convert: Callable[[dict], object]


FORMATS: dict[str, Format] = {
    "alpaca": Format("chat", frozenset({"instruction", "output"}), frozenset({CAUSAL_LM}), alpaca_record),
    "sharegpt": Format("chat", frozenset({"conversations"}), frozenset({CAUSAL_LM}), sharegpt_record),
    "messages": Format("chat", frozenset({"messages"}), frozenset({CAUSAL_LM}), messages_record),
    "text": Format("text", frozenset({"text"}), frozenset({CAUSAL_LM}), text_record),
    "classification": Format("classification", frozenset({"text", "label"}), frozenset({CLASSIFICATION}), classification_record),
    "preference": Format("preference", frozenset({"chosen", "rejected"}), frozenset({CAUSAL_LM}), preference_record),
    "sharegpt_preference": Format("preference", frozenset({"conversations", "chosen", "rejected"}), frozenset({CAUSAL_LM}),
                                  sharegpt_preference_record),
    "kto": Format("kto", frozenset({"prompt", "completion", "label"}), frozenset({CAUSAL_LM}), kto_record),
    "sharegpt_kto": Format("kto", frozenset({"conversations", "kto_tag"}), frozenset({CAUSAL_LM}), sharegpt_kto_record),
}
assert FORMATS.keys() == FORMAT_FIELDS.keys(), "ftune.recipe.schema.FORMAT_FIELDS and FORMATS list different formats"


def renamed(fields: dict, columns: dict[str, str]) -> dict:
    """The row under the format's field names (``columns`` maps field -> the dataset's column)."""
    if not columns:
        return fields
    out = {k: v for k, v in fields.items() if k not in columns}
    for field, column in columns.items():
        if column in fields:
            out[field] = fields[column]
    return out


def detect_format(keys: set[str], task: str, *, key: str, shown: str) -> str:
    """The one format the columns identify for ``task``; the most specific wins (text+label over text)."""
    matches = [name for name, fmt in FORMATS.items() if task in fmt.tasks and fmt.keys <= keys]
    best = [m for m in matches if all(FORMATS[other].keys <= FORMATS[m].keys for other in matches)]
    if len(best) != 1:
        found = ", ".join(sorted(keys)) or "none"
        options = [name for name, fmt in FORMATS.items() if task in fmt.tasks]
        hint = " or ".join(f"{name} ({', '.join(sorted(FORMATS[name].keys))})" for name in options)
        raise FtuneError(
            f"{key}.format: cannot tell the format of {shown} from its columns ({found}) for task {task}; "
            f"set format: to {'one of ' if len(options) > 1 else ''}{', '.join(options)}, and map differently named columns "
            f"with columns: (expected {hint})"
        )
    return best[0]


def refuse_unsupported(name: str, *, key: str, shown: str) -> None:
    """KTO rows are recognised, so the refusal can say what they are and how to use them today."""
    if FORMATS[name].kind == "kto":
        label = "kto_tag" if name == "sharegpt_kto" else "label"
        raise FtuneError(
            f"{key}.format: {shown} holds KTO rows (one completion with a boolean {label}), unpaired preference data "
            "that no ftune stage trains on yet; pair a good and a bad completion of each prompt into chosen/rejected "
            "rows (format: preference), or keep the good completions as chat rows"
        )


def resolve_format(source: DatasetSource, rows: list[Row], task: str, *, key: str, shown: str) -> str:
    """The entry's format, checking that its columns (mapped or not) exist in the data."""
    present: set[str] = set()
    for row in rows:
        present.update(row.fields)
    for field, column in source.columns.items():
        if column not in present:
            raise FtuneError(f"{key}.columns.{field}: column '{column}' is not in {shown} (columns: {', '.join(sorted(present))})")
    keys = set(renamed(dict.fromkeys(present), source.columns))
    name = detect_format(keys, task, key=key, shown=shown) if source.format == "auto" else source.format
    refuse_unsupported(name, key=key, shown=shown)
    missing = sorted(FORMATS[name].keys - keys)
    if missing:
        raise FtuneError(
            f"{key}: format {name} needs column '{missing[0]}', which {shown} does not have (columns: {', '.join(sorted(present))}); "
            f"map it with {key}.columns: {{{missing[0]}: <your column>}}"
        )
    return name


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """``messages`` with the recipe's system prompt in front, unless they bring their own."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def convert_rows(rows: list[Row], name: str, columns: dict[str, str], *, source: int, system_prompt: str | None,
                 problems: list[str], tools: list[dict] | None = None) -> list[Record]:
    """Records of the rows that convert cleanly; each failing row adds one line to ``problems``.

    ``tools`` are the entry's schemas, for rows without a ``tools`` column of their own.
    """
    fmt = FORMATS[name]
    records = []
    for row in rows:
        fields = renamed(row.fields, columns)
        try:
            value = fmt.convert(fields)
            row_schemas = row_tools(fields, tools) if name in TOOL_FORMATS else None
            if row_schemas:
                check_called_names(value, row_schemas)
        except RowError as exc:
            problems.append(f"{row.origin}: {exc.describe(columns)}")
            continue
        if fmt.kind == "chat":
            value = with_system_prompt(value, system_prompt)
        records.append(Record(fmt.kind, value, row.origin, source, row_schemas or None))
    return records


def label_names_of(records: list[Record], names: list[str] | None) -> list[str]:
    """Class names in id order: ``data.labels`` when given, else from the data. Integer labels 0..max name
    themselves; string labels are sorted (numerically when all are digits), so the same data always
    gives the same ids."""
    if names is not None:
        return list(names)
    labels = [r.value[1] for r in records]
    if labels and all(isinstance(label, int) for label in labels):
        return [str(i) for i in range(max(max(labels), 0) + 1)]
    found = {str(label) for label in labels}
    numeric = all(name.lstrip("-").isdigit() for name in found)
    return sorted(found, key=lambda name: (int(name), name) if numeric else (0, name))


def assign_label_ids(records: list[Record], names: list[str], problems: list[str]) -> list[Record]:
    """Records with the label replaced by its class id; a label outside ``names`` is a row problem."""
    ids = {name: index for index, name in enumerate(names)}
    out = []
    for record in records:
        text, label = record.value
        if isinstance(label, str) and label not in ids and label.isdigit():
            label = int(label)  # CSV cells are text: "1" is class id 1 unless a class is named "1"
        if isinstance(label, int):
            label_id = label if 0 <= label < len(names) else None  # an integer label is already a class id
        else:
            label_id = ids.get(label)
        if label_id is None:
            problems.append(f"{record.origin}: field 'label' value {label!r} is not one of the labels ({', '.join(names)})")
            continue
        out.append(Record(record.kind, [text, label_id], record.origin, record.source))
    return out


def rows_to_records(rows: list[Row], task: str, *, system_prompt: str | None = None, key: str = "--split") -> list[Record]:
    """Records of a one-off file (e.g. ``ftune eval --split FILE``), format detected, failing on any bad row."""
    keys: set[str] = set()
    for row in rows:
        keys.update(row.fields)
    shown = rows[0].origin.rsplit(":", 1)[0]
    name = detect_format(keys, task, key=key, shown=shown)
    refuse_unsupported(name, key=key, shown=shown)
    problems: list[str] = []
    records = convert_rows(rows, name, {}, source=0, system_prompt=system_prompt, problems=problems)
    raise_problems(problems)
    return records
