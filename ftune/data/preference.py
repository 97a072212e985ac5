"""Preference rows in the layouts peers use, each normalised to one (prompt messages, chosen, rejected) triple.

TRL writes prompt/chosen/rejected as strings or message lists (or only chosen/rejected as whole
conversations sharing the prompt turns); LLaMA-Factory writes a ShareGPT history with chosen/rejected
as single message objects. KTO rows (one completion and a boolean label) are read too, so they can be
recognised and refused with the reason until a stage trains on them.
"""

from __future__ import annotations

from ftune.data.turns import MESSAGE_ROLES, SHAREGPT_ROLES, RowError, chat_turns, text_field, with_system


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
    messages = with_system(row, chat_turns(row, "conversations", "from", "value", SHAREGPT_ROLES))
    return {"prompt": messages[:-1], "completion": messages[-1]["content"], "label": kto_label(row, "kto_tag")}
