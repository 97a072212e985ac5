"""The sft stage's Trainer: examples batched by the recipe's packing, the loss at the labelled positions only.

Data comes from ``ftune.data`` (sources, formats, chat templates, response masking); this module decides
how a batch is laid out on the model (packed rows or dynamic padding, ``data.packing``) and where the LM
head runs: Liger's fused cross-entropy on CUDA when the kernels are on, else ``label_positions``'
head-and-loss at the positions that have a target, where the model allows it.
"""

from __future__ import annotations

from ftune.recipe import Recipe
from ftune.recipe.tasks import CAUSAL_LM
from ftune.training.trainer import TrainerSpec


def build_sft_splits(recipe: Recipe, tokenizer):
    from ftune.data import build_datasets

    return build_datasets(recipe.data, tokenizer, recipe.task)


def describe_sft_splits(splits) -> str:
    from ftune.data import describe_splits

    return describe_splits(splits)


def sft_spec(model, tokenizer, splits, recipe: Recipe, *, liger: bool = False) -> TrainerSpec:
    from transformers import Trainer

    from ftune.data import build_collator

    batching = build_collator(model, tokenizer, task=recipe.task, packing=recipe.data.packing)
    collator, loss_func, loss_note = batching.collator, None, None
    if liger and recipe.task == CAUSAL_LM:
        loss_note = "Loss: Liger's fused linear cross-entropy (the logits are never materialised)"
    elif recipe.task == CAUSAL_LM:
        from ftune.training.label_positions import keeps_labelled_positions, labelled_positions_blocker, loss_at_labelled_positions

        if (blocker := labelled_positions_blocker(model, recipe.method.name)) is None:
            config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
            coefficient = getattr(config, "router_aux_loss_coef", 0.0) if getattr(config, "output_router_logits", False) else 0.0
            from ftune.training.chunked_loss import LOSS_CHUNK, chunking_blocker

            chunk = LOSS_CHUNK if chunking_blocker(model) is None else None  # past it, the head runs a chunk at a time
            collator, loss_func = keeps_labelled_positions(collator, chunk), loss_at_labelled_positions(coefficient, model)
            loss_note = "Loss: LM head and cross-entropy at the labelled positions only" + (
                f", {LOSS_CHUNK} positions at a time in longer rows" if chunk else "")
        else:
            loss_note = f"Loss: LM head at every position ({blocker})"
    return TrainerSpec(Trainer, splits.train, splits.eval or None, options={"use_liger_kernel": liger}, collator=collator,
                       loss_func=loss_func, counts_example_tokens=True,
                       notes=(batching.note, *((loss_note,) if loss_note else ())))
