"""Inference over a run directory: load the tuned, merged or base model, and generate replies (batched or streamed).

Shared by ``eval``, ``merge`` (parity prompts), ``generate`` and ``chat``. Prompts are rendered with
the tokenizer saved in the run, i.e. the chat template the training data was rendered with, and
with the recipe's system prompt, so the model sees what it was trained on.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable

from ftune.errors import FtuneError
from ftune.methods import load_trained
from ftune.model import load_base_model, load_tokenizer
from ftune.recipe import Recipe, method_class
from ftune.recipe.schema import QuantizationConfig
from ftune.run_dir import RunDir

# Plain transformers class that loads a complete model folder of each task (merged or fully tuned).
PLAIN_AUTO_CLASSES = {"causal_lm": "AutoModelForCausalLM", "classification": "AutoModelForSequenceClassification"}


def run_labels(run: RunDir) -> list[str] | None:
    """Class names of a classification run (``labels.json``), in label-id order; None for other runs."""
    path = run.root / "labels.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data = data.get("label_names") or data.get("labels") or [data["id2label"][k] for k in sorted(data["id2label"], key=int)]
    return [str(name) for name in data]


def base_loader(recipe: Recipe, run: RunDir | None = None, *, quantization: QuantizationConfig | None = None, dtype: str | None = None):
    """A loader of the recipe's base model that methods call to get something to wrap.

    ``quantization`` and ``dtype`` replace the recipe's (merge reloads a QLoRA base in full precision);
    keyword arguments of ``load_base_model`` such as ``location=`` pass through.
    """
    model_config = recipe.model if dtype is None else recipe.model.model_copy(update={"dtype": dtype})
    return functools.partial(
        load_base_model,
        model_config,
        recipe.quantization if quantization is None else quantization,
        task=recipe.task,
        labels=run_labels(run) if run is not None else None,
    )


def load_model(run: RunDir, recipe: Recipe, *, tuned: bool = True):
    """(model, tokenizer) in eval mode: the trained artifact of the run, or the untuned base."""
    from transformers import AutoTokenizer

    if tuned:
        tokenizer = AutoTokenizer.from_pretrained(run.model)
        model = load_trained(recipe.method.name, base_loader(recipe, run), run.model)
    else:
        from ftune.data.templates import install_chat_template

        tokenizer = load_tokenizer(recipe.model)
        install_chat_template(tokenizer, recipe.data)  # the run's tokenizer carries it; the base's must get it too
        model = base_loader(recipe, run)()
    model.eval()
    return model, tokenizer


def fold_for_speed(model, recipe: Recipe):
    """Fold a mergeable adapter into float32 base weights in memory: the logits stay equal (~1e-6
    relative, what the merge parity check measures) and CPU generation runs ~3x faster, since the
    adapter's extra matmuls go away. Quantized or half-precision bases keep the adapter separate:
    folding would round the update into their coarser weights."""
    import torch

    if recipe.quantization.bits or not method_class(recipe.method.name).mergeable or not hasattr(model, "merge_and_unload"):
        return model
    if any(param.dtype != torch.float32 for param in model.parameters()):
        return model
    return model.merge_and_unload().eval()


def load_plain_model(directory: Path, task: str = "causal_lm", *, dtype="auto"):
    """A complete model folder through plain transformers (no peft, no ftune), in eval mode."""
    import transformers

    auto = getattr(transformers, PLAIN_AUTO_CLASSES[task])
    return auto.from_pretrained(directory, dtype=dtype).eval()


def load_merged(run: RunDir, recipe: Recipe):
    """(model, tokenizer) of ``RUN/merged`` as written by ``ftune merge``; a run that trained complete
    weights (full fine-tuning) needs no merge, so its ``RUN/model`` serves."""
    from transformers import AutoTokenizer

    directory = run.model if (run.model / "config.json").is_file() else run.merged
    if not (directory / "config.json").is_file():
        raise FtuneError(f"--merged: {run.merged} does not exist; create it with: ftune merge {run.root}")
    return load_plain_model(directory, recipe.task), AutoTokenizer.from_pretrained(directory)


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """Split a conversation before its last assistant turn: what the model sees, and what it should say."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def reply_logits(logits, input_length: int):
    """Logits of the input positions only: prompt-tuning methods prepend virtual tokens to the output."""
    return logits[:, -input_length:] if logits.shape[1] > input_length else logits


def generation_options(tokenizer, *, max_new_tokens: int, temperature: float = 0.0) -> dict:
    """Greedy unless a temperature is given; stop at the template's end of turn like training taught."""
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    return dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling)


def model_device(model):
    return next(model.parameters()).device


def generate_replies(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy replies for each prompt conversation, batched with left padding."""
    import torch

    tokenizer.padding_side = "left"
    device = model_device(model)
    replies = []
    for start in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts[start : start + batch_size]]
        batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
        with torch.no_grad():
            output = model.generate(**batch, **generation_options(tokenizer, max_new_tokens=max_new_tokens))
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        replies.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return [reply.strip() for reply in replies]


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


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
