"""Chat templates: the tokenizer's own by default, or the recipe's ``data.chat_template`` (a name in
``ftune/chat_templates/``, shipped as package data, a ``.jinja`` file, or inline Jinja).

The chosen template is installed on the tokenizer, which training saves into the run directory, so
eval, generate and chat render prompts exactly as the training data was rendered.
"""

from __future__ import annotations

from pathlib import Path

from ftune.errors import FtuneError
from ftune.recipe.data import DataConfig, chat_template_dir, chat_template_names, is_inline_template


def read_chat_template(value: str) -> str:
    """The Jinja text a ``data.chat_template`` value stands for."""
    if is_inline_template(value):
        return value
    path = chat_template_dir() / f"{value}.jinja" if value in chat_template_names() else Path(value)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FtuneError(f"data.chat_template: cannot read {path}: {exc}") from exc


def install_chat_template(tokenizer, config: DataConfig) -> None:
    """Put the recipe's chat template on the tokenizer (no-op when the recipe keeps the tokenizer's own)."""
    if config.chat_template is not None:
        tokenizer.chat_template = read_chat_template(config.chat_template)


def check_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        names = ", ".join(chat_template_names())
        raise FtuneError(
            "the tokenizer has no chat template, so chat/instruction data cannot be rendered; "
            f"set data.chat_template: chatml (or one of {names}, a .jinja file, or inline Jinja), or use an instruct model"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise FtuneError("response masking needs a fast tokenizer (offset mappings); this model only has a slow one")


def check_tool_template(tokenizer) -> None:
    """Refuse tool-calling rows when the template would silently drop their schemas, calls or results."""
    from ftune.data.tools import template_renders_tools

    if not template_renders_tools(tokenizer):
        raise FtuneError(
            "data.chat_template: the chat template does not render tool schemas, tool calls and tool results (it drops "
            "them), so tool-calling rows cannot be trained; set data.chat_template: chatml-tools (ChatML with the tools "
            "in the system turn and calls as JSON in <tool_call> tags) or use a model whose template supports tools"
        )


def render(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
    # tools=None, not [], when there are none: templates test `tools is not none` as often as `tools`.
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of every assistant turn.

    A turn starts where the prompt rendered with ``add_generation_prompt`` ends, and ends where the
    conversation rendered through that turn ends, so the template's end-of-turn token is inside;
    trailing whitespace after it (the newline between turns) is not. Assistant turns that call tools
    are spans like any other; tool results (``role: tool``) never are.
    """
    text = render(tokenizer, messages, tools=tools)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:index], add_generation_prompt=True, tools=tools) if index else ""
        through = text if index == len(messages) - 1 else render(tokenizer, messages[: index + 1], tools=tools)
        if not text.startswith(before) or not text.startswith(through) or len(before) > len(through):
            raise ValueError(
                "the chat template renders this conversation differently from its own prefixes, so the response "
                "tokens cannot be located; set data.train_on_prompt: true or use another data.chat_template"
            )
        end = len(through.rstrip())
        spans.append((len(before), max(end, len(before))))
    return text, spans
