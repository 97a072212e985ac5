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
        check_layout_markers(tokenizer, config.chat_template)
        tokenizer.chat_template = read_chat_template(config.chat_template)


def check_layout_markers(tokenizer, name: str) -> None:
    """Refuse a shipped family layout whose end-of-turn marker this vocabulary would split into pieces.

    Generation stops on token ids; a marker spelled in several ordinary tokens is never one id, so the
    tuned model would talk past the end of its turn. (chatml also ends replies with EOS, so it always stops.)
    """
    from ftune.families import CHAT_LAYOUTS

    layout = CHAT_LAYOUTS.get(name)
    if layout is None or name == "chatml":
        return
    vocabulary = tokenizer.get_vocab()
    missing = [marker for marker in layout.markers if marker not in vocabulary]
    if missing:
        raise FtuneError(
            f"data.chat_template: {name} needs {', '.join(missing)} as single tokens, and this tokenizer has no such "
            f"token{'s' if len(missing) > 1 else ''}, so generation could not stop at the end of a turn; use "
            "data.chat_template: chatml (it also ends replies with EOS) or a tokenizer of that family"
        )


def check_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        from ftune.families import FAMILIES, local_model_type

        family = FAMILIES.get(local_model_type(getattr(tokenizer, "name_or_path", "") or ""))  # its own layout, if it has one
        suggested = family.chat_template if family and family.chat_template else "chatml"
        names = ", ".join(chat_template_names())
        raise FtuneError(
            "the tokenizer has no chat template, so chat/instruction data cannot be rendered; "
            f"set data.chat_template: {suggested} (or one of {names}, a .jinja file, or inline Jinja), or use an instruct model"
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


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token ids that close an assistant turn in the tokenizer's chat template, EOS first; generation stops on any.

    Read from the template itself: the special or added tokens it writes right after a reply (ChatML's
    <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>, Phi-3's <|end|>, or EOS). A tokenizer
    without a template, or one that renders no such token, stops on EOS alone.
    """
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if not getattr(tokenizer, "chat_template", None):
        return stops
    reply = "ftune-end-of-turn-probe"
    try:
        text = render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}])
    except Exception:  # noqa: BLE001 - a template that cannot render this is reported where data is rendered
        return stops
    after = text[text.rfind(reply) + len(reply):]
    marked = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    for token in ids:
        if token not in marked:
            break  # the markers come first; what follows (a newline) is not part of the turn's end
        if token not in stops and token != tokenizer.pad_token_id:
            stops.append(token)
    return stops


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
