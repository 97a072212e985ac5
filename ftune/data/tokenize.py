"""Tokenize records into training examples, with loss only on what the model should learn.

Chat records are rendered with the chat template; masking works on characters, not on guessed
token boundaries: a token is trained when its characters overlap an assistant turn's span (see
``templates.assistant_spans``), so every assistant turn and its end-of-turn token are in the loss.
Tool-calling chats are rendered with their schemas (``tools=``); the assistant's calls are trained,
the tool results are context. Text records train on every token and end with EOS. Classification records keep one class id.
Examples are stored column-wise (``TokenizedExamples``) so large datasets stay compact and cache fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ftune.data.formats import Record
from ftune.data.templates import assistant_spans, check_chat_template, check_tool_template, end_of_turn_ids, render
from ftune.data.tools import has_tool_turns
from ftune.errors import FtuneError

IGNORE_INDEX = -100
CHUNK_ROWS = 1000  # records tokenized per batch call: large enough to amortise, small enough to stream


@dataclass
class TokenizeStats:
    rows: int = 0  # records in
    truncated: int = 0  # cut to max_length (kept)
    dropped_too_long: int = 0  # over max_length with truncation: drop
    dropped_no_target: int = 0  # truncation cut every trained token
    rejected: int = 0  # the chat template refused the row (data.on_error: skip)
    missing_eos: int = 0  # untruncated examples whose trained tokens never include EOS or the template's end of turn
    tokens: int = 0
    trained_tokens: int = 0  # label positions that are loss targets (the first position never is)

    @property
    def dropped(self) -> int:
        return self.dropped_too_long + self.dropped_no_target + self.rejected


class TokenizedExamples(Sequence):
    """Examples as flat int32 columns plus offsets; indexing yields ``{"input_ids": [...], "labels": [...] | int}``."""

    def __init__(self, input_ids: np.ndarray, offsets: np.ndarray, labels: np.ndarray | None = None,
                 classes: np.ndarray | None = None, origins: list[str] | None = None) -> None:
        self.input_ids, self.offsets, self.labels, self.classes = input_ids, offsets, labels, classes
        self.origins = origins  # where each example came from; kept in memory only (preview), never cached

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        start, end = self.offsets[index], self.offsets[index + 1]
        label = int(self.classes[index]) if self.classes is not None else self.labels[start:end].tolist()
        return {"input_ids": self.input_ids[start:end].tolist(), "labels": label}

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def save(self, path: Path) -> None:
        columns = {"input_ids": self.input_ids, "offsets": self.offsets}
        columns.update({k: v for k, v in (("labels", self.labels), ("classes", self.classes)) if v is not None})
        with path.open("wb") as handle:
            np.savez(handle, **columns)

    @classmethod
    def load(cls, path: Path) -> TokenizedExamples:
        with np.load(path) as data:
            return cls(data["input_ids"], data["offsets"], data["labels"] if "labels" in data else None,
                       data["classes"] if "classes" in data else None)

    @classmethod
    def empty(cls, *, classification: bool = False) -> TokenizedExamples:
        none = np.zeros(0, dtype=np.int32)
        return cls(none, np.zeros(1, dtype=np.int64), None if classification else none, none if classification else None)


# Each encoder turns a batch of records into (input_ids, labels or class id, untruncated length)
# per record, or a problem string for records it cannot encode.
Encoded = tuple[np.ndarray, np.ndarray | int, int] | str


def encode_chat(tokenizer, records: list[Record], *, train_on_prompt: bool, max_length: int, truncation: str) -> list[Encoded]:
    from jinja2 import TemplateError, TemplateSyntaxError

    check_chat_template(tokenizer)
    if any(record.tools or has_tool_turns(record.value) for record in records):
        check_tool_template(tokenizer)
    results: list[Encoded | None] = [None] * len(records)
    texts, spans, slots = [], [], []
    for slot, record in enumerate(records):
        try:
            if train_on_prompt:
                text, turns = render(tokenizer, record.value, tools=record.tools), None
            else:
                text, turns = assistant_spans(tokenizer, record.value, record.tools)
        except TemplateSyntaxError as exc:
            raise FtuneError(f"data.chat_template: the chat template does not parse: {exc}") from exc
        except (TemplateError, ValueError, TypeError, KeyError) as exc:
            results[slot] = f"{record.origin}: the chat template rejects this conversation: {exc}"
            continue
        texts.append(text)
        spans.append(turns)
        slots.append(slot)
    if texts:
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=not train_on_prompt)
        for index, slot in enumerate(slots):
            ids = np.asarray(encoded["input_ids"][index], dtype=np.int32)
            if spans[index] is None:
                labels = ids.copy()
            else:
                offsets = np.asarray(encoded["offset_mapping"][index], dtype=np.int64).reshape(-1, 2)
                trained = np.zeros(len(ids), dtype=bool)
                for start, end in spans[index]:
                    trained |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
                labels = np.where(trained, ids, IGNORE_INDEX).astype(np.int32)
            results[slot] = (ids, labels, len(ids))
    return results


def encode_text(tokenizer, records: list[Record], *, train_on_prompt: bool, max_length: int, truncation: str) -> list[Encoded]:
    eos = tokenizer.eos_token_id
    results = []
    for ids in tokenizer([r.value for r in records], add_special_tokens=True)["input_ids"]:
        if eos is not None and (not ids or ids[-1] != eos):
            ids = [*ids, eos]  # documents end with EOS so the model learns where text stops
        array = np.asarray(ids, dtype=np.int32)
        results.append((array, array.copy(), len(array)))
    return results


def encode_classification(tokenizer, records: list[Record], *, train_on_prompt: bool, max_length: int, truncation: str) -> list[Encoded]:
    texts = [r.value[0] for r in records]
    results = []
    for text, record, ids in zip(texts, records, tokenizer(texts, add_special_tokens=True)["input_ids"]):
        full = len(ids)
        if full > max_length and truncation == "truncate":
            # Re-encode with the tokenizer's own truncation so closing special tokens ([SEP]) stay.
            ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        results.append((np.asarray(ids, dtype=np.int32), record.value[1], full))
    return results


ENCODERS = {"chat": encode_chat, "text": encode_text, "classification": encode_classification}


def tokenize_records(tokenizer, records: list[Record], *, max_length: int, truncation: str = "truncate",
                     train_on_prompt: bool = False, problems: list[str] | None = None,
                     keep_origins: bool = False) -> tuple[TokenizedExamples, TokenizeStats]:
    """Tokenize ``records`` in order; rows the template rejects go to ``problems`` (the caller fails or skips)."""
    problems = [] if problems is None else problems
    classification = bool(records) and records[0].kind == "classification"
    stats = TokenizeStats(rows=len(records))
    stops = end_of_turn_ids(tokenizer)  # EOS and the template's end-of-turn marker: what generation stops on
    ids_parts, label_parts, classes, lengths, origins = [], [], [], [], []
    for start in range(0, len(records), CHUNK_ROWS):
        chunk = records[start : start + CHUNK_ROWS]
        encoded: list[Encoded | None] = [None] * len(chunk)
        for kind in dict.fromkeys(r.kind for r in chunk):
            slots = [i for i, r in enumerate(chunk) if r.kind == kind]
            outputs = ENCODERS[kind](tokenizer, [chunk[i] for i in slots], train_on_prompt=train_on_prompt,
                                     max_length=max_length, truncation=truncation)
            for slot, output in zip(slots, outputs):
                encoded[slot] = output
        for record, output in zip(chunk, encoded):
            if isinstance(output, str):
                problems.append(output)
                stats.rejected += 1
                continue
            ids, labels, full = output
            if full > max_length:
                if truncation == "drop":
                    stats.dropped_too_long += 1
                    continue
                stats.truncated += 1
                ids = ids[:max_length]
                labels = labels if classification else labels[:max_length]
            if not classification:
                trained = int(np.count_nonzero(labels[1:] != IGNORE_INDEX))
                if trained == 0:
                    stats.dropped_no_target += 1  # truncation cut the whole response: nothing to learn
                    continue
                if full <= max_length and stops and not np.any(np.isin(labels, stops)):
                    stats.missing_eos += 1
                stats.trained_tokens += trained
                label_parts.append(labels)
            else:
                classes.append(labels)
            stats.tokens += len(ids)
            ids_parts.append(ids)
            lengths.append(len(ids))
            if keep_origins:
                origins.append(record.origin)
    if not ids_parts:
        return TokenizedExamples.empty(classification=classification), stats
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return TokenizedExamples(
        np.concatenate(ids_parts),
        offsets,
        None if classification else np.concatenate(label_parts),
        np.asarray(classes, dtype=np.int64) if classification else None,
        origins if keep_origins else None,
    ), stats
