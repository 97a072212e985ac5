"""Preference rows in the layouts peers use, each normalised to one (prompt messages, chosen, rejected) triple.

TRL writes prompt/chosen/rejected as strings or message lists (or only chosen/rejected as whole
conversations sharing the prompt turns); LLaMA-Factory writes a ShareGPT history with chosen/rejected
as single message objects. KTO rows (one completion and a boolean label: TRL's prompt/completion/label, a
chat row's last reply with LLaMA-Factory's ``kto_tag`` or ``label``) become one (prompt messages, completion,
label) record for ``stage: kto``.

A pair is tokenized as prompt ids (the template's generation prompt) plus the chosen and rejected
completion ids (the rest of the rendered conversation), each piece tokenized without special tokens,
so a template's BOS/EOS appear exactly once; a KTO completion is tokenized the same way. Pairs that cannot teach anything (both sides the same
after truncation, an empty side, a prompt that leaves no room for the answer) are damaged: listed with
file:line and left out; more than ``preference.max_damaged_share`` of them refuses the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ftune.data.templates import render
from ftune.data.turns import MESSAGE_ROLES, SHAREGPT_ROLES, RowError, chat_turns, text_field, with_system
from ftune.errors import MAX_LISTED_PROBLEMS, FtuneError


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


# CSV cells are text: "true"/"false" are the booleans a spreadsheet writes
KTO_WORDS = {"true": True, "false": False}


def kto_flag(value: object) -> bool | None:
    """A KTO label's value as a bool, or None when it is not one (any other type or word)."""
    if isinstance(value, bool):
        return value
    return KTO_WORDS.get(value.strip().lower()) if isinstance(value, str) else None


def kto_label(row: dict, name: str) -> bool:
    label = kto_flag(row.get(name))
    if label is None:
        raise RowError(name, f"must be true (desirable) or false (undesirable), got {row.get(name)!r}")
    return label


def kto_of_chat(messages: list[dict], row: dict, name: str) -> dict:
    """A conversation as a KTO record: its last reply is the labelled completion, the turns before it the prompt."""
    last = messages[-1]
    if last["role"] != "assistant" or last.get("tool_calls"):
        raise RowError(name, "labels the last reply, but the conversation does not end with an assistant text reply")
    return {"prompt": messages[:-1], "completion": last["content"], "label": kto_label(row, name)}


def kto_record(row: dict) -> dict:
    return {"prompt": with_system(row, [{"role": "user", "content": text_field(row, "prompt")}]),
            "completion": text_field(row, "completion"), "label": kto_label(row, "label")}


def sharegpt_kto_record(row: dict) -> dict:
    return kto_of_chat(with_system(row, chat_turns(row, "conversations", "from", "value", SHAREGPT_ROLES)), row, "kto_tag")


def unpaired(records: list) -> list:
    """Preference pairs as KTO rows, as TRL unpairs them for KTO: the chosen answer desirable, the rejected one
    undesirable, both under the pair's prompt and origin; other records unchanged."""
    out = []
    for record in records:
        if record.kind != "preference":
            out.append(record)
            continue
        for answer, label in ((record.value["chosen"], True), (record.value["rejected"], False)):
            out.append(replace(record, kind="kto", value={"prompt": record.value["prompt"], "completion": answer, "label": label}))
    return out


@dataclass
class Pairs:
    rows: list[dict]  # {"prompt_ids", "chosen_ids", "rejected_ids"}; KTO: {"prompt_ids", "completion_ids", "label"}
    damaged: list[str] = field(default_factory=list)  # "file:line: why"


def render_completions(tokenizer, prompt: list[dict], answers: list[str], tools: list[dict] | None = None) -> list[str]:
    """[prompt text, then each answer's completion text], each rendered once by the template (with the row's tools)."""
    prompt_text = render(tokenizer, prompt, add_generation_prompt=True, tools=tools)
    completions = []
    for answer in answers:
        full = render(tokenizer, prompt + [{"role": "assistant", "content": answer}], tools=tools)
        if not full.startswith(prompt_text):
            raise ValueError("the chat template renders the prompt differently once the answer follows; check data.chat_template")
        completions.append(full[len(prompt_text):])
    return [prompt_text, *completions]


def render_pair(tokenizer, record) -> tuple[str, str, str]:
    """(prompt text, chosen completion text, rejected completion text)."""
    return tuple(render_completions(tokenizer, record.value["prompt"], [record.value["chosen"], record.value["rejected"]]))


def tokenize_completions(tokenizer, records, *, max_length: int, max_prompt_length: int | None) -> Pairs:
    """KTO records as prompt ids, completion ids and label; a prompt that leaves no room for the answer is damage."""
    rows = Pairs([])
    for record in records:
        try:
            texts = render_completions(tokenizer, record.value["prompt"], [record.value["completion"]], record.tools)
        except ValueError as exc:
            rows.damaged.append(f"{record.origin}: {exc}")
            continue
        prompt_ids, completion_ids = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)
        if max_prompt_length is not None:
            prompt_ids = prompt_ids[-max_prompt_length:]  # the end of the prompt is what the answer follows
        if len(prompt_ids) >= max_length:
            rows.damaged.append(f"{record.origin}: the prompt alone is {len(prompt_ids)} tokens, data.max_length {max_length} "
                                "cuts away the whole answer")
        else:
            rows.rows.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": record.value["label"]})
    return rows


def tokenize_pairs(tokenizer, records, *, max_length: int, max_prompt_length: int | None) -> Pairs:
    pairs = Pairs([])
    for record in records:
        try:
            prompt_text, chosen, rejected = render_pair(tokenizer, record)
        except ValueError as exc:
            pairs.damaged.append(f"{record.origin}: {exc}")
            continue
        prompt_ids, chosen_ids, rejected_ids = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (prompt_text, chosen, rejected))
        if max_prompt_length is not None:
            prompt_ids = prompt_ids[-max_prompt_length:]  # the end of the prompt is what the answer follows
        room = max_length - len(prompt_ids)
        why = None
        if not record.value["chosen"].strip() or not record.value["rejected"].strip():
            why = "an empty chosen or rejected answer"
        elif room <= 0:
            why = f"the prompt alone is {len(prompt_ids)} tokens, data.max_length {max_length} cuts away the whole answer"
        elif chosen_ids[:room] == rejected_ids[:room]:
            why = f"chosen and rejected are identical within data.max_length {max_length}"
        if why:
            pairs.damaged.append(f"{record.origin}: {why}")
        else:
            pairs.rows.append({"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids})
    return pairs


def check_damage(pairs: Pairs, total: int, max_share: float, split: str, what: str = "preference pairs") -> str | None:
    """Refuse above ``max_share`` damaged pairs; else a note naming the first ones (None when none)."""
    if not pairs.damaged:
        return None
    share = len(pairs.damaged) / max(total, 1)
    listed = pairs.damaged[:MAX_LISTED_PROBLEMS]
    if share > max_share or not pairs.rows:
        raise FtuneError(
            *listed, f"{split}: {len(pairs.damaged)} of {total} {what} are damaged ({100 * share:.1f}%), above "
            f"preference.max_damaged_share {max_share}; fix these rows, raise data.max_length, or raise preference.max_damaged_share",
        )
    return f"{split}: left out {len(pairs.damaged)} damaged {what}, first: {listed[0]}"
