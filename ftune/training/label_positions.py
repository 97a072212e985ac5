"""The causal-LM loss computed from the LM head at labelled positions only.

In SFT only the answer tokens carry loss (12.7% of the quickstart's tokens), yet the model's own
loss runs the LM head (vocab x hidden: ~21% of SmolLM2-135M's forward FLOPs) and a vocab-wide
log-softmax at every position, forward and backward. The collator adds ``logits_to_keep``: the
sequence positions whose next token is labelled in some row of the batch; transformers' causal LMs
then project only those hidden states, and ``loss_at_labelled_positions`` computes the same
token-summed cross-entropy over the same targets, divided by the same count, as the model's loss.
Where more than ``LOSS_CHUNK`` positions are kept in a row (long answers, continued pretraining), the collator
keeps none and asks for the hidden states instead, and the loss runs the head a chunk at a time
(``chunked_loss``), so the logits of a long row are never all alive at once.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from ftune.training.chunked_loss import LOSS_CHUNK, chunked_loss

IGNORE = -100


def next_token_targets(labels):
    """Per position, the label of the next token (the shift every causal-LM loss makes); IGNORE at the end."""
    import torch

    return torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[..., 1:]


def labelled_positions(labels):
    """Sequence positions whose next token is labelled in at least one row (1-D, sorted)."""
    return (next_token_targets(labels) != IGNORE).any(dim=0).nonzero().squeeze(-1)


def keeps_labelled_positions(collator: Callable[[list[dict]], dict], chunk: int | None = None) -> Callable[[list[dict]], dict]:
    """``collator`` plus the positions the head runs at; past ``chunk`` of them, none, and the hidden states instead."""
    def collate(features: list[dict]) -> dict:
        batch = collator(features)
        positions = labelled_positions(batch["labels"])
        if chunk is not None and len(positions) > chunk:
            batch["logits_to_keep"], batch["output_hidden_states"] = positions[:0], True
        else:
            batch["logits_to_keep"] = positions
        return batch

    return collate


def loss_at_labelled_positions(router_aux_loss_coef: float = 0.0, model: Any = None, chunk: int = LOSS_CHUNK):
    """A Trainer ``compute_loss_func`` for batches from ``keeps_labelled_positions``; ``model``'s head computes the
    chunked loss of batches that kept the hidden states instead of the logits."""
    from transformers.loss.loss_utils import fixed_cross_entropy

    def loss(outputs, labels, num_items_in_batch=None):
        positions = labelled_positions(labels)
        targets = next_token_targets(labels)[:, positions]
        if outputs.logits.shape[1] != len(positions):  # the collator kept the hidden states: a chunk at a time
            hidden = outputs.hidden_states[-1][:, positions.to(outputs.hidden_states[-1].device)]
            head = (model.get_base_model() if hasattr(model, "get_base_model") else model).get_output_embeddings()
            value = chunked_loss(head, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).to(hidden.device), num_items_in_batch,
                                 chunk)
        else:
            logits = outputs.logits.float()
            value = fixed_cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device), num_items_in_batch)
        aux = getattr(outputs, "aux_loss", None)
        if aux is not None and router_aux_loss_coef:  # what a mixture of experts adds to its own loss
            value = value + router_aux_loss_coef * aux.to(value.device)
        return value

    return loss


def router_aux_loss_coefficient(model: Any) -> float:
    """What a mixture of experts adds of its router loss to its own loss (0 where it adds none)."""
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    return getattr(config, "router_aux_loss_coef", 0.0) if getattr(config, "output_router_logits", False) else 0.0


def labelled_positions_blocker(model: Any, method_name: str) -> str | None:
    """Why the labelled-positions loss cannot apply to ``model``, or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__} cannot compute logits at chosen positions"
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False) and \
            getattr(model.active_peft_config, "peft_type", None) != "PREFIX_TUNING":
        return f"method {method_name} prepends virtual tokens, which shift every position"
    return None
