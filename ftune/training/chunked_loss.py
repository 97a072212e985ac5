"""The LM head and cross-entropy over many positions, a chunk of positions at a time.

A long row with many labelled positions (continued pretraining, long answers) would otherwise hold
(positions x vocabulary) float32 logits, their log-softmax and its gradient at once: SmolLM2's vocabulary of
49,152 makes that 805 MB per copy for 4096 positions. Here the head runs on ``LOSS_CHUNK`` positions at a
time; each chunk's summed cross-entropy is kept and its logits are dropped, and the backward recomputes
one chunk's logits at a time (``torch.utils.checkpoint``), so memory for the logits stops growing with the
row. The sum over chunks divided by the same count is the same loss as the head over all positions, up
to the order of a float32 sum.
"""

from __future__ import annotations

from typing import Any

LOSS_CHUNK = 1024  # positions per chunk: 1024 x 49,152 x 4 B = 201 MB per copy on SmolLM2
IGNORE = -100
# Post-head transforms a model applies inside its forward, which a head called here would skip.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def chunking_blocker(model: Any) -> str | None:
    """Why the head cannot be run outside ``model``'s forward, or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    transforms = [name for name in LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1, 1.0)]
    if transforms:
        return f"{type(base).__name__} transforms its logits after the head ({', '.join(transforms)})"
    if base.get_output_embeddings() is None:
        return f"{type(base).__name__} has no output embeddings"
    return None


def summed_cross_entropy(head, hidden, targets, chunk: int = LOSS_CHUNK):
    """Token-summed cross-entropy of ``head(hidden)`` against ``targets`` (IGNORE skipped), ``chunk`` rows alive at a time.

    ``hidden`` is (rows, hidden) at the positions that reach the head, ``targets`` (rows,)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    # The loss runs after the model's forward, outside its autocast: a head held in bf16 (training.base_dtype) gets its
    # input as autocast would have handed it over, rounded to the weight's dtype.
    weight = getattr(head, "weight", None)
    dtype = weight.dtype if weight is not None and weight.dtype != hidden.dtype and not torch.is_autocast_enabled(hidden.device.type) else None

    def chunk_loss(h, t):
        logits = head(h if dtype is None else h.to(dtype)).float()  # the same upcast as the loss over all positions
        return torch.nn.functional.cross_entropy(logits, t, ignore_index=IGNORE, reduction="sum")

    total = None
    for start in range(0, hidden.shape[0], chunk):
        part = checkpoint(chunk_loss, hidden[start:start + chunk], targets[start:start + chunk], use_reentrant=False)
        total = part if total is None else total + part
    return total


def chunked_loss(head, hidden, targets, num_items_in_batch=None, chunk: int = LOSS_CHUNK):
    """The value transformers' ``fixed_cross_entropy`` gives over all rows: summed over ``num_items_in_batch`` when it is
    given (the accumulation window's labelled tokens), else the mean over the non-ignored targets."""
    import torch

    total = summed_cross_entropy(head, hidden, targets, chunk)
    if num_items_in_batch is None:
        return total / (targets != IGNORE).sum()
    return total / (num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
