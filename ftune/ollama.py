"""Ollama Modelfile beside an exported GGUF: FROM, the chat TEMPLATE, stop tokens and the system prompt.

The tokenizer's Jinja chat template is not translated symbol by symbol (Jinja and Go templates share
no grammar); instead its output on probe conversations is matched against the turn layouts of
``LAYOUTS``, each of which has a known Go form. A template that matches none gets no TEMPLATE line
(Ollama then falls back to the GGUF's own chat template metadata) and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftune.families import CHAT_LAYOUTS


@dataclass(frozen=True)
class TurnLayout:
    """Every turn is ``before + role + after + content + end``; the reply starts with ``reply_start``."""

    before: str
    after: str
    end: str
    reply_start: str

    def render(self, messages: list[dict]) -> str:
        turns = "".join(f"{self.before}{m['role']}{self.after}{m['content']}{self.end}" for m in messages)
        return turns + self.reply_start

    def go_template(self) -> str:
        # Ollama puts the Modelfile's SYSTEM into .Messages as a system turn when a request has none.
        return f"{{{{- range .Messages }}}}{self.before}{{{{ .Role }}}}{self.after}{{{{ .Content }}}}{self.end}{{{{ end }}}}{self.reply_start}"


# The chat layouts whose turns share one shape (ChatML, whose models' default system prompts are found by probing;
# Llama 3; Phi-3): the others have no Go form of it.
LAYOUTS: dict[str, TurnLayout] = {name: TurnLayout(*layout.turn) for name, layout in CHAT_LAYOUTS.items() if layout.turn}

# Plain words on purpose: no template trims or escapes them, so a layout match is exact.
_PROBE = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]
_PROBE_SYSTEM = {"role": "system", "content": "Answer in one word."}


@dataclass(frozen=True)
class ChatFormat:
    layout: str
    template: str  # Go template, as Ollama's TEMPLATE takes it
    stop: tuple[str, ...]
    default_system: str | None  # what the Jinja template inserts when a conversation has no system turn


def detect_chat_format(tokenizer: Any, *, runtime_adds_bos: bool) -> ChatFormat | None:
    """The layout whose rendering equals the tokenizer's own on the probe conversations, or None."""
    if not isinstance(tokenizer.chat_template, str):
        return None

    def jinja(messages: list[dict]) -> str:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos = tokenizer.bos_token
        # llama.cpp puts BOS in front of the prompt itself when the GGUF says so; the template must not repeat it.
        return text[len(bos):] if runtime_adds_bos and bos and text.startswith(bos) else text

    with_system, without_system = jinja([_PROBE_SYSTEM, *_PROBE]), jinja(_PROBE)
    for name, layout in LAYOUTS.items():
        if layout.render([_PROBE_SYSTEM, *_PROBE]) != with_system:
            continue
        default_system = None
        if layout.render(_PROBE) != without_system:
            default_system = _inserted_system(layout, without_system)
            if default_system is None or layout.render([{"role": "system", "content": default_system}, *_PROBE]) != without_system:
                continue
        stop = tuple(dict.fromkeys(token for token in (layout.end.strip(), tokenizer.eos_token) if token))
        return ChatFormat(name, layout.go_template(), stop, default_system)
    return None


def _inserted_system(layout: TurnLayout, rendered: str) -> str | None:
    start = f"{layout.before}system{layout.after}"
    if not rendered.startswith(start):
        return None
    end = rendered.find(layout.end, len(start))
    return rendered[len(start):end] if end >= 0 else None


def modelfile_text(gguf_name: str, chat: ChatFormat | None, *, system_prompt: str | None, adapter: str | None = None) -> str:
    """The Modelfile of ``gguf_name``; with ``adapter`` (a GGUF LoRA file beside it) the base plus that adapter."""
    lines = [f"# ollama create NAME -f {(adapter or gguf_name).removesuffix('.gguf')}.Modelfile", f"FROM ./{gguf_name}"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    if chat is not None:
        lines.append(f'TEMPLATE """{chat.template}"""')
        lines += [f'PARAMETER stop "{token}"' for token in chat.stop]
    system = system_prompt if system_prompt is not None else chat.default_system if chat is not None else None
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def modelfile_path(gguf_file: Path) -> Path:
    return gguf_file.with_suffix(".Modelfile")
