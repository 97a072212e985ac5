"""The tokenizer half of a GGUF file: vocabulary, merges, special ids, chat template and the pre-tokenizer name,
under llama.cpp's metadata keys (``ftune.gguf`` writes the weights)."""

from __future__ import annotations

import json
from typing import Any, Sequence

from ftune.errors import FtuneError


class UnsupportedExport(FtuneError):
    """The model or the requested options cannot be exported to the requested format."""


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """Byte-level BPE vocabulary, merges, special ids and chat template, under llama.cpp's keys."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise UnsupportedExport("GGUF export supports byte-level BPE tokenizers only (like GPT-2, Llama 3, Qwen2)")

    tokens = {index: token for token, index in model["vocab"].items()}
    types = dict.fromkeys(tokens, gguf.TokenType.NORMAL)
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    if max(tokens) >= vocab_size:
        raise UnsupportedExport(f"tokenizer has ids up to {max(tokens)} but the model's vocab_size is {vocab_size}")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    # llama.cpp needs one token per embedding row; rows the tokenizer never emits get placeholders.
    writer.add_token_list([tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)])
    writer.add_token_types([types.get(i, gguf.TokenType.UNUSED) for i in range(vocab_size)])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])

    for key in ("bos", "eos", "pad", "unk"):
        if (token_id := getattr(tokenizer, f"{key}_token_id")) is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    bos, eos = special_tokens_added(tokenizer)
    writer.add_add_bos_token(bos)
    writer.add_add_eos_token(eos)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def special_tokens_added(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding puts BOS in front and EOS at the end; the GGUF then tells llama.cpp to do the same."""
    with_special, plain = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    bos = with_special[:1] != plain[:1] and with_special[0] == tokenizer.bos_token_id
    eos = with_special[-1:] != plain[-1:] and with_special[-1] == tokenizer.eos_token_id
    return bos, eos


def _pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """The ``tokenizer.ggml.pre`` name that makes llama.cpp split text the way this tokenizer does.

    Unrecognised shapes get "default"; the tokenizer round trip check then reports any mismatch.
    """
    parts: Sequence[dict] = (pre_tokenizer or {}).get("pretokenizers") or ([pre_tokenizer] if pre_tokenizer else [])
    shape = [(p["type"], p.get("individual_digits"), p.get("use_regex")) for p in parts]
    if shape == [("ByteLevel", None, True)]:
        return "gpt-2"
    if shape == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"
    if len(parts) == 2 and shape[0][0] == "Split" and shape[1] == ("ByteLevel", None, False):
        try:  # transformers' private table of llama.cpp's split regexes; if it moves, the round trip check decides
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
        except ImportError:
            return "default"

        regex = parts[0].get("pattern", {}).get("Regex")
        return next((name for name, known in GGUF_PRE_TOKENIZER_SPLITS.items() if known == regex), "default")
    return "default"
