"""Task heads: the freshly initialised modules a task adds on top of the base (the classifier of a
sequence-classification model). Every method must train them, whatever else it freezes, and save them."""

from __future__ import annotations

from ftune.errors import FtuneError
from ftune.families import FAMILIES

# Any family's head names, whatever the model type: those without a row (ELECTRA) use the same ones.
CLASSIFICATION_HEADS = tuple(dict.fromkeys(name for family in FAMILIES.values() for name in family.classification_head))


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
