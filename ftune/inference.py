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


def stream_reply(model, tokenizer, messages: list[dict], *, max_new_tokens: int, temperature: float = 0.0) -> str:
    """Generate one reply to ``messages``, printing tokens to stdout as they come; returns the reply text."""
    import torch
    from transformers import TextStreamer

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(model_device(model))
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        output = model.generate(**batch, streamer=streamer, **generation_options(tokenizer, max_new_tokens=max_new_tokens, temperature=temperature))
    return tokenizer.decode(output[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def run_chat(
    model, tokenizer, *, system_prompt: str | None, max_new_tokens: int, temperature: float = 0.0,
    read: Callable[[str], str] = input, echo: Callable[[str], None] = print,
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
        reply = stream_reply(model, tokenizer, with_system_prompt(history, system_prompt), max_new_tokens=max_new_tokens, temperature=temperature)
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
