"""Row formats: each turns one raw row into a record of one kind (chat, text, classification, preference).

Chat rows may call tools: ShareGPT ``function_call`` / ``observation`` turns and OpenAI-style
``tool_calls`` / ``role: tool`` messages both become the chat-template form (see ``ftune.data.tools``),
with the row's ``tools`` column, or the entry's ``tools:``, kept on the record for the template.
Preference rows in every layout become one (prompt messages, chosen, rejected) triple; a KTO row (TRL's
prompt/completion/label, or any chat row with a boolean ``kto_tag`` / ``label``) one (prompt messages,
completion, label) record. A column no format field reads is named in a note (``unused_columns_note``), so no
meaning a row carries is dropped silently.

``FORMATS`` is the dispatch table: per format, the record kind it yields, the columns that identify
it when the recipe says ``format: auto``, the tasks it can serve, and its converter. A recipe's
``columns:`` mapping renames a dataset's columns to the format's fields before conversion, and
problems are reported under the user's column names, with the row's file:line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from ftune.data.preference import (kto_flag, kto_of_chat, kto_record, preference_record, sharegpt_kto_record,
                                   sharegpt_preference_record)
from ftune.data.sources import Row
from ftune.data.turns import (MESSAGE_ROLES, SHAREGPT_ROLES, RowError, chat_turns, check_called_names, row_tools, text_field,
                              with_system)
from ftune.errors import FtuneError, raise_problems
from ftune.recipe.tasks import CAUSAL_LM, CLASSIFICATION
from ftune.recipe.data import FORMAT_FIELDS, KTO_LABELS, TOOL_FORMATS, DatasetSource


@dataclass(frozen=True)
class Record:
    kind: str  # "chat" | "text" | "classification" | "preference" | "kto"
    # messages | text | [text, label] | {"prompt": messages, "chosen": str, "rejected": str}
    # | {"prompt": messages, "completion": str, "label": bool}
    value: object
    origin: str
    source: int  # index of the recipe entry in its split (mixing weights are per entry)
    tools: list[dict] | None = None  # chat: tool schemas for the template's tools= argument

    @property
    def content_key(self) -> str:
        """Canonical text of the record: equal for exact duplicates, whatever file or format they came from."""
        parts = [self.kind, self.value] + ([self.tools] if self.tools else [])
        return json.dumps(parts, sort_keys=True, ensure_ascii=False)


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


def kto_column(rows: list[Row], name: str, columns: dict[str, str]) -> str | None:
    """The field that labels a chat entry's rows for KTO: one the recipe maps, else the first of ``KTO_LABELS`` holding
    a true/false value in some row (a label of other values, e.g. a topic, labels nothing here)."""
    if FORMATS[name].kind != "chat":
        return None
    mapped = [field for field in KTO_LABELS if field in columns]
    if mapped:
        return mapped[0]
    return next((field for field in KTO_LABELS if any(kto_flag(renamed(row.fields, columns).get(field)) is not None for row in rows)),
                None)


# Columns whose meaning no stage reads from a row, and what to do with them instead
SCORE_HINT = ("no stage trains on a score; to prefer higher-scored answers, pair them into chosen/rejected rows (stage: dpo) "
              "or label each completion true/false (stage: kto)")
SCORE_COLUMNS = ("score", "reward", "rating")


def unused_columns_note(rows: list[Row], name: str, columns: dict[str, str], *, key: str, shown: str) -> str | None:
    """A note naming the columns of ``rows`` that format ``name`` does not read (so nothing they mean is trained), or None."""
    present: set[str] = set()
    for row in rows:
        present.update(row.fields)
    label, chat = kto_column(rows, name, columns), FORMATS[name].kind == "chat"
    # a chat format reads a label column only where it labels completions (``kto_column``)
    read = {columns.get(field, field) for field in FORMAT_FIELDS[name] if not chat or field not in KTO_LABELS or field == label}
    unused = sorted(present - read)
    if not unused:
        return None
    note = f"{key}: {shown} has column{'s' if len(unused) > 1 else ''} {', '.join(repr(c) for c in unused)} that format {name} does not read"
    if scores := [c for c in unused if c.lower() in SCORE_COLUMNS]:
        note += f"; {', '.join(scores)}: {SCORE_HINT}"
    if labels := [c for c in unused if c in KTO_LABELS and chat]:
        note += f"; {', '.join(labels)} holds no true/false value, so it labels no completion for stage: kto"
    return note


def refuse_hidden_pairs(name: str, keys: set[str], *, key: str, shown: str) -> None:
    """Chosen/rejected columns under a format that reads neither would train the wrong answer or none."""
    if FORMATS[name].kind != "preference" and {"chosen", "rejected"} <= keys:
        raise FtuneError(f"{key}.format: {shown} has chosen/rejected columns, which format {name} does not read; use format: "
                         "preference or sharegpt_preference (stage: dpo, orpo or reward)")


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
    refuse_hidden_pairs(name, keys, key=key, shown=shown)
    if source.tools and name not in TOOL_FORMATS:
        raise FtuneError(f"{key}.tools: {shown} holds {name} rows, which have no tool turns to offer tools to; "
                         f"remove tools, or use {' or '.join(TOOL_FORMATS)} rows")
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
    label = kto_column(rows, name, columns)
    records = []
    for row in rows:
        fields = renamed(row.fields, columns)
        kind = fmt.kind
        try:
            value = fmt.convert(fields)
            row_schemas = row_tools(fields, tools) if name in TOOL_FORMATS else None
            if row_schemas:
                check_called_names(value, row_schemas)
            if kind == "chat":
                value = with_system_prompt(value, system_prompt)
            if label is not None:
                kind, value = "kto", kto_of_chat(value, fields, label)
            elif kind == "kto":
                value = {**value, "prompt": with_system_prompt(value["prompt"], system_prompt)}
        except RowError as exc:
            problems.append(f"{row.origin}: {exc.describe(columns)}")
            continue
        records.append(Record(kind, value, row.origin, source, row_schemas or None))
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
    refuse_hidden_pairs(name, keys, key=key, shown=shown)
    problems: list[str] = []
    records = convert_rows(rows, name, {}, source=0, system_prompt=system_prompt, problems=problems)
    raise_problems(problems)
    return records
