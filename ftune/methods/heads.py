"""Task heads: the freshly initialised modules a task adds on top of the base (the classifier of a
sequence-classification model). Every method must train them, whatever else it freezes, and save them."""

from __future__ import annotations

from ftune.errors import FtuneError

# Top-level module names transformers gives sequence-classification heads (Llama/Qwen/GPT-2: score;
# BERT/RoBERTa: classifier; DistilBERT adds pre_classifier in front of it).
CLASSIFICATION_HEADS = ("pre_classifier", "classifier", "score")


def task_head_names(model, task: str) -> list[str]:
    """Names of the head modules ``task`` added to ``model`` (none for causal LM, whose head is pretrained)."""
    if task != "classification":
        return []
    names = [name for name, _ in model.named_children() if name in CLASSIFICATION_HEADS]
    if not names:
        raise FtuneError(
            f"task: classification: {type(model).__name__} has no classification head named "
            f"{' or '.join(CLASSIFICATION_HEADS)}; load the model with task: classification or use task: causal_lm"
        )
    return names


def unfreeze_task_head(model, task: str) -> list[str]:
    names = task_head_names(model, task)
    for name in names:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    return names
