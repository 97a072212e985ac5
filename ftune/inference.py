"""Inference over a run directory: load the tuned (or base) model as trained, and generate replies in batches.

Shared by ``eval``, ``merge`` (parity prompts) and ``generate``; prompts are rendered with the same
chat template the training data was rendered with.
"""

from __future__ import annotations

import functools

from ftune.methods import load_trained
from ftune.model import load_base_model, load_tokenizer
from ftune.recipe import Recipe
from ftune.run_dir import RunDir


def base_loader(recipe: Recipe):
    """A zero-argument loader of the recipe's base model (methods call it to get something to wrap)."""
    return functools.partial(load_base_model, recipe.model, recipe.quantization, task=recipe.task)


def load_model(run: RunDir, recipe: Recipe, *, tuned: bool = True):
    """(model, tokenizer) in eval mode: the trained artifact of the run, or the untuned base."""
    from transformers import AutoTokenizer

    if tuned:
        tokenizer = AutoTokenizer.from_pretrained(run.model)
        model = load_trained(recipe.method.name, base_loader(recipe), run.model)
    else:
        tokenizer = load_tokenizer(recipe.model)
        model = base_loader(recipe)()
    model.eval()
    return model, tokenizer


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """Split a conversation before its last assistant turn: what the model sees, and what it should say."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def generate_replies(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy replies for each prompt conversation, batched with left padding."""
    import torch

    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    replies = []
    for start in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts[start : start + batch_size]]
        batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
        with torch.no_grad():
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        replies.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return [reply.strip() for reply in replies]
