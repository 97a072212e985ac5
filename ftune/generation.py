"""Generating replies with a loaded model: greedy by default, stopping where training taught the model to stop.

Used by eval (batched, scored against references) and by generate/chat (streamed).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    text: str
    stopped: bool  # ended on the end-of-sequence / end-of-turn token, not cut at max_new_tokens


def model_device(model):
    return next(model.parameters()).device


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """Split a conversation before its last assistant turn: what the model sees, and what it should say."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def generation_options(tokenizer, *, max_new_tokens: int, temperature: float = 0.0) -> dict:
    """Greedy unless a temperature is given; stop at the template's end of turn like training taught."""
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    from ftune.data.templates import end_of_turn_ids

    return dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=end_of_turn_ids(tokenizer), **sampling)


def generate_replies(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, batch_size: int,
                     tools: list[list[dict] | None] | None = None) -> list[Reply]:
    """Greedy replies for each prompt conversation (or prompt text the chat template rendered already), batched with
    left padding; ``tools`` are per-prompt schemas."""
    import torch

    tokenizer.padding_side = "left"
    device = model_device(model)
    tools = tools or [None] * len(prompts)
    options = generation_options(tokenizer, max_new_tokens=max_new_tokens)
    stops = torch.tensor(options["eos_token_id"], device=device)
    replies = []
    for start in range(0, len(prompts), batch_size):
        texts = [p if isinstance(p, str) else tokenizer.apply_chat_template(p, tools=t or None, tokenize=False, add_generation_prompt=True)
                 for p, t in zip(prompts[start : start + batch_size], tools[start : start + batch_size])]  # str: rendered already
        batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
        with torch.no_grad():
            output = model.generate(**batch, **options)
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        # Special tokens are dropped from the text; a template's <tool_call> tags are plain text in most vocabularies,
        # and where they are special tokens the call JSON between them still parses.
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        stopped = torch.isin(new_tokens, stops).any(dim=1).tolist()  # pad differs from every stop (model loading ensures it)
        replies.extend(Reply(text.strip(), stop) for text, stop in zip(texts, stopped))
    return replies
