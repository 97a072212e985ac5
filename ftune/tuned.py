"""The models a run directory stands for: the tuned model (base + the method's artifact), the untuned
base, and the complete weights of a merged or fully tuned run.

Everything is loaded from the run directory and the recipe it saved, so eval, merge, export and
generate share one way of rebuilding what training produced. Prompts are rendered with the
tokenizer saved in the run, i.e. the chat template the training data was rendered with.
"""

from __future__ import annotations

import functools
from pathlib import Path

from ftune.errors import FtuneError
from ftune.methods import load_trained
from ftune.model import load_base_model, load_tokenizer
from ftune.recipe import Recipe, method_class
from ftune.recipe.schema import QuantizationConfig
from ftune.recipe.tasks import CAUSAL_LM, TASKS
from ftune.run_dir import RunDir, run_labels


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


def load_plain_model(directory: Path, task: str = CAUSAL_LM, *, dtype="auto"):
    """A complete model folder through plain transformers (no peft, no ftune), in eval mode."""
    import transformers

    auto = getattr(transformers, TASKS[task].auto_class)
    return auto.from_pretrained(directory, dtype=dtype).eval()


def load_merged(run: RunDir, recipe: Recipe):
    """(model, tokenizer) of ``RUN/merged`` as written by ``ftune merge``; a run that trained complete
    weights (full fine-tuning) needs no merge, so its ``RUN/model`` serves."""
    from transformers import AutoTokenizer

    directory = run.model if run.has_complete_weights() else run.merged
    if not (directory / "config.json").is_file():
        raise FtuneError(f"--merged: {run.merged} does not exist; create it with: ftune merge {run.root}")
    return load_plain_model(directory, recipe.task), AutoTokenizer.from_pretrained(directory)
