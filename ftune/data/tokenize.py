"""Render conversations with the chat template and tokenize them, with loss only on what the model should learn.

Masking works on characters, not on guessed token boundaries: each assistant turn's span in the
rendered text is found by rendering the conversation up to that turn, and tokens whose first
character falls inside a span are trained. The span ends after the template's end-of-turn token,
so the model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ftune.errors import FtuneError

IGNORE_INDEX = -100


@dataclass
class TokenizeStats:
    rows: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    lengths: list[int] = field(default_factory=list)


def check_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise FtuneError(
            "the tokenizer has no chat template, so chat/instruction data cannot be rendered; "
            "use a chat (instruct) model or a tokenizer that ships one"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise FtuneError("response masking needs a fast tokenizer (offset mappings); this model only has a slow one")


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans of every assistant turn."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True) if index else ""
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not text.startswith(before) or not text.startswith(through):
            raise FtuneError(
                "the chat template renders a conversation differently from its own prefixes, so response tokens "
                "cannot be located; set data.train_on_prompt: true or use another template"
            )
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_conversation(tokenizer, messages: list[dict], *, max_length: int, train_on_prompt: bool) -> dict:
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoded["input_ids"]
    if train_on_prompt:
        labels = list(input_ids)
    else:
        labels = [
            token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
            for token, (begin, _) in zip(input_ids, encoded["offset_mapping"])
        ]
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length], "full_length": len(input_ids)}


def tokenize_conversations(tokenizer, conversations: list[list[dict]], *, max_length: int, train_on_prompt: bool) -> tuple[list[dict], TokenizeStats]:
    check_chat_template(tokenizer)
    stats = TokenizeStats()
    examples = []
    for messages in conversations:
        stats.rows += 1
        example = tokenize_conversation(tokenizer, messages, max_length=max_length, train_on_prompt=train_on_prompt)
        if example.pop("full_length") > max_length:
            stats.truncated += 1
        trained = sum(label != IGNORE_INDEX for label in example["labels"])
        if trained == 0:
            stats.dropped_no_target += 1  # truncation cut the whole response: nothing to learn
            continue
        stats.tokens += len(example["input_ids"])
        stats.trained_tokens += trained
        stats.lengths.append(len(example["input_ids"]))
        examples.append(example)
    return examples, stats


class PadCollator:
    """Right-pads a batch: pad id for inputs, IGNORE_INDEX for labels, zeros in the attention mask."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "labels": [], "attention_mask": []}
        for feature in features:
            pad = longest - len(feature["input_ids"])
            batch["input_ids"].append(list(feature["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(feature["labels"]) + [IGNORE_INDEX] * pad)
            batch["attention_mask"].append([1] * len(feature["input_ids"]) + [0] * pad)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
