"""Generate and chat stage: talk to a run's tuned (or merged) model, replies streamed as they come.

Prompts are rendered with the tokenizer saved in the run and the recipe's system prompt, so the
model sees what it was trained on.
"""

from __future__ import annotations

from typing import Callable

from ftune.data.formats import with_system_prompt
from ftune.errors import FtuneError
from ftune.generation import generation_options, model_device
from ftune.tuned import fold_for_speed, load_merged, load_model


def read_tools(path) -> list[dict]:
    """Tool schemas from a JSON file (a list of {name, description, parameters} or {type: function, function})."""
    import json
    from pathlib import Path

    from ftune.data.tools import ToolError, tool_schemas
    from ftune.text_files import read_utf8

    path = Path(path)
    try:
        return tool_schemas(json.loads(read_utf8(path)))
    except FileNotFoundError:
        raise FtuneError(f"--tools {path}: no such file; give a JSON file holding a list of tool schemas") from None
    except json.JSONDecodeError as exc:
        raise FtuneError(f"--tools {path}: not valid JSON ({exc.msg} at line {exc.lineno}); it must hold a list of tool schemas") from None
    except ToolError as exc:
        raise FtuneError(f"--tools {path}: the schema list {exc}") from None


def recipe_tools(recipe) -> list[dict] | None:
    """The tools the recipe offered for a whole training file (``data.train[].tools``), if every entry that
    declares tools declares the same ones: the set the model was taught to call."""
    declared = [[tool.model_dump() for tool in source.tools] for source in recipe.data.train if source.tools]
    if declared and all(tools == declared[0] for tools in declared):
        return declared[0]
    return None


def offered_tools(path, recipe, tokenizer) -> list[dict] | None:
    """The tools a generate/chat session offers: ``--tools FILE``, else the recipe's own (see recipe_tools)."""
    from ftune.data.tools import template_renders_tools

    tools = read_tools(path) if path is not None else recipe_tools(recipe)
    if tools and not template_renders_tools(tokenizer):
        raise FtuneError("--tools: this run's chat template drops tool schemas, so the model would never see them; "
                         "train with data.chat_template: chatml-tools (or a template that renders tools)")
    return tools


def stream_reply(model, tokenizer, messages: list[dict], *, max_new_tokens: int, temperature: float = 0.0,
                 tools: list[dict] | None = None) -> str:
    """Generate one reply to ``messages`` (offering ``tools`` through the chat template), printing tokens to
    stdout as they come; returns the reply text."""
    import torch
    from transformers import TextStreamer

    text = tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False, add_generation_prompt=True)
    batch = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(model_device(model))
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        output = model.generate(**batch, streamer=streamer, **generation_options(tokenizer, max_new_tokens=max_new_tokens, temperature=temperature))
    return tokenizer.decode(output[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def run_chat(
    model, tokenizer, *, system_prompt: str | None, max_new_tokens: int, temperature: float = 0.0,
    tools: list[dict] | None = None, read: Callable[[str], str] = input, echo: Callable[[str], None] = print,
) -> int:
    """Interactive loop: each line is a user turn, the reply streams back; ``/exit`` or end of input stops,
    ``/reset`` forgets the conversation. Returns the number of replies."""
    history: list[dict] = []
    replies = 0
    while True:
        try:
            line = read(">>> ").strip()
        except EOFError:
            echo("")
            return replies
        if line == "/exit":
            return replies
        if line == "/reset":
            history = []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply = stream_reply(model, tokenizer, with_system_prompt(history, system_prompt), max_new_tokens=max_new_tokens,
                             temperature=temperature, tools=tools)
        history.append({"role": "assistant", "content": reply})
        replies += 1


def load_for_generation(run_dir, *, merged: bool = False):
    """(model, tokenizer, recipe) of a causal LM run for generate/chat: the adapter model, or ``RUN/merged``."""
    from ftune.run_dir import load_run
    from ftune.runtime import quiet_libraries

    run, recipe = load_run(run_dir)
    if recipe.is_classification:
        raise FtuneError(f"{run.root}: a classification run predicts labels, it does not generate text; score it with ftune eval")
    quiet_libraries()
    if merged:
        model, tokenizer = load_merged(run, recipe)
    else:
        model, tokenizer = load_model(run, recipe)
        model = fold_for_speed(model, recipe)
    return model, tokenizer, recipe
