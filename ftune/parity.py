"""Logit parity: does one model compute what another does? Used by merge, export and eval.

Sequences run one at a time, so they may differ in length and need no padding or attention mask.
Tolerances are relative to the largest |reference logit| (``LogitParity.scale``): ~0.7 on a tiny
random model, ~47 on SmolLM2, so one absolute number cannot serve every model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LogitParity:
    max_abs_diff: float
    agreement: float  # share of positions (sequences, for a classifier) whose argmax agrees
    scale: float  # largest |reference logit|


def reply_logits(logits, input_length: int):
    """Logits of the input positions only: prompt-tuning methods prepend virtual tokens to the output."""
    return logits[:, -input_length:] if logits.shape[1] > input_length else logits


def _forward(model: Any, ids) -> Any:
    import torch

    batch = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1).to(next(model.parameters()).device)
    return reply_logits(model(input_ids=batch).logits, batch.shape[1]).float().cpu()


def compare_logits(reference_model: Any, candidate_model: Any, sequences) -> LogitParity:
    """Max abs logit difference, argmax agreement and logit scale over ``sequences`` (lists of ids or a 2-D tensor)."""
    import torch

    worst, scale, agree, total = 0.0, 0.0, 0, 0
    with torch.inference_mode():
        for ids in sequences:
            ref, cand = _forward(reference_model, ids), _forward(candidate_model, ids)
            worst = max(worst, (ref - cand).abs().max().item())
            scale = max(scale, ref.abs().max().item())
            agree += (ref.argmax(-1) == cand.argmax(-1)).sum().item()
            total += ref.argmax(-1).numel()
    return LogitParity(worst, agree / max(total, 1), scale)


def logit_scale(model: Any, sequences) -> float:
    """Largest |logit| of ``model`` over ``sequences``: what relative tolerances are multiplied by."""
    import torch

    scale = 0.0
    with torch.inference_mode():
        for ids in sequences:
            scale = max(scale, _forward(model, ids).abs().max().item())
    return scale
