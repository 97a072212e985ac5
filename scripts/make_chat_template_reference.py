"""Render probe conversations with llama.cpp's built-in chat templates, the reference for ftune's shipped ones.

llama.cpp implements each family's instruct layout in C++ (src/llama-chat.cpp), independently of the
Jinja templates in ftune/chat_templates. This script renders the same conversations with both for every
layout in ftune.families.CHAT_LAYOUTS and writes llama.cpp's output to tests/assets/chat-template-reference.json,
which tests/unit/test_chat_templates.py compares the Jinja renderings with (and, where the llamacpp extra
is installed, re-renders live). llama.cpp writes no BOS (its tokenizer adds it), so BOS is dropped from
ftune's side, and the end-of-sequence marker it spells literally is the EOS given here per layout.

Usage (needs the llamacpp extra)::

    python scripts/make_chat_template_reference.py
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "assets" / "chat-template-reference.json"

# What each layout's EOS is in its own family's tokenizer (llama.cpp writes it as text).
EOS = {"chatml": "<|im_end|>", "mistral": "</s>", "deepseek": "<｜end▁of▁sentence｜>"}

CONVERSATIONS = {
    "one turn": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
    "system and two turns": [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ],
    "multi-line reply": [
        {"role": "user", "content": "List two colours."},
        {"role": "assistant", "content": "1. red\n2. blue"},
    ],
}


def llama_cpp_render(layout: str, messages: list[dict], *, add_generation_prompt: bool) -> str:
    import llama_cpp

    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages]
    )
    size = 4096
    buffer = ctypes.create_string_buffer(size)
    written = llama_cpp.llama_chat_apply_template(layout.encode(), chat, len(messages), add_generation_prompt, buffer, size)
    if written < 0:
        raise ValueError(f"llama.cpp does not know the chat template {layout!r}")
    return buffer.raw[:written].decode("utf-8")


def reference() -> dict:
    """Per ftune layout: llama.cpp's template name, the EOS used, and each conversation's prompt and full renderings."""
    from ftune.families import CHAT_LAYOUTS

    out = {}
    for name, layout in CHAT_LAYOUTS.items():
        rows = {}
        for title, messages in CONVERSATIONS.items():
            rows[title] = {
                "messages": messages,
                "full": llama_cpp_render(layout.llama_cpp, messages, add_generation_prompt=False),
                # The prompt a reply is generated from: everything before the last assistant turn.
                "prompt": llama_cpp_render(layout.llama_cpp, messages[:-1], add_generation_prompt=True),
            }
        out[name] = {"llama_cpp": layout.llama_cpp, "eos": EOS.get(name), "conversations": rows}
    return out


def main() -> None:
    import llama_cpp

    data = {"llama_cpp_python": llama_cpp.__version__, "layouts": reference()}
    REFERENCE.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {REFERENCE} ({len(data['layouts'])} layouts, llama-cpp-python {llama_cpp.__version__})")


if __name__ == "__main__":
    main()
