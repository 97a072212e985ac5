"""The frozen base of an adapter method held in bfloat16 when the run autocasts to bfloat16.

Under bf16 autocast every matmul casts its float32 weight to bf16 on every forward, and a frozen weight is never
cached by autocast (only leaves that require grad are): on SmolLM2-135M with LoRA r16 those casts were ~7.5% of a
step (``scripts/profile_step.py --shapes``). Casting the frozen linears once to bf16 hands autocast the tensors it
would have made itself (the same round-to-nearest-even), so every matmul sees bit-identical inputs and the copies
go away. Embeddings are cast too (half their memory; the largest frozen tensor of a small model, and the LM head's
weight when tied), with their output turned back to the weight's old dtype so the residual stream stays float32 as
under autocast; the embedded values are then bf16-rounded, the one numerical difference (``tests/tolerances.py``).
Norms, biases outside linears and every trainable tensor keep their dtype: autocast runs norms in float32, and the
adapters and their optimizer state stay float32, so the saved adapter is unchanged.

It applies only where every forward of the run is inside the Trainer's autocast: methods that freeze the base
(``trains_base_weights`` False), a float32 base that is not quantized, and the stages that train and evaluate
through the Trainer's loss (grpo generates outside autocast; TRL's pair and KTO trainers are not covered yet), and
not under Liger's fused head on CUDA (``training.session`` checks; not verified with a bf16 head weight).
Merge, export, eval and generation load their own float32 base and never see this.
"""

from __future__ import annotations

from ftune.recipe import Recipe, method_class
from ftune.recipe.stages import PRETRAIN, SFT

STAGES = (SFT, PRETRAIN)


def holds_base_in_bf16(recipe: Recipe, precision: str) -> bool:
    """Whether a run of ``recipe`` autocasting in ``precision`` ("no", "bf16", "fp16") holds its frozen base in bf16."""
    return (precision == "bf16" and recipe.stage in STAGES and not method_class(recipe.method.name).trains_base_weights
            and not recipe.quantization.bits and recipe.model.dtype in ("auto", "float32"))


def expected_precision(requested: str, device: str) -> str:
    """The autocast mode ``training.mixed_precision: requested`` will probably resolve to, from file probes only (what
    ``ftune plan`` assumes; auto on a GPU counts as bf16, which an older GPU resolves to fp16)."""
    from ftune.hardware import cheap_autocast_16bit

    if requested != "auto":
        return requested
    return "bf16" if cheap_autocast_16bit(requested, device) else "no"


def _restore_dtype(dtype):
    def hook(module, args, output):
        return output.to(dtype)

    return hook


def hold_frozen_base_in_bf16(model) -> int:
    """Cast ``model``'s frozen float32 linear and embedding weights to bf16 in place (tied weights stay tied: the
    Parameter objects are kept); returns how many parameters were cast."""
    import torch
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    cast: set[int] = set()
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Embedding, Conv1D)):
            continue
        params = list(module.parameters(recurse=False))
        if not params or any(p.requires_grad or p.dtype not in (torch.float32, torch.bfloat16) for p in params):
            continue
        for param in params:
            if param.dtype == torch.float32:
                param.data = param.data.to(torch.bfloat16)
                cast.add(id(param))
        if isinstance(module, nn.Embedding) and id(module.weight) in cast:  # a tied weight may have been cast as the head
            module.register_forward_hook(_restore_dtype(torch.float32))
    if cast:
        # A checkpoint's tensors can be views of one memory-mapped file; the float32 pages the cast just read stay
        # resident while any view of the file lives. The frozen tensors left (norms) get their own copies, which releases
        # the mapping: SmolLM2-135M's resident memory after the cast, 1,209 -> 696 MiB.
        for param in model.parameters():
            if not param.requires_grad and id(param) not in cast:
                param.data = param.data.clone()
    return len(cast)


def describe_base_dtype(model) -> str:
    """The dtype holding most frozen parameters (what the run's header and manifest report)."""
    counts: dict[str, int] = {}
    for param in model.parameters():
        if not param.requires_grad:
            name = str(param.dtype).removeprefix("torch.")
            counts[name] = counts.get(name, 0) + param.numel()
    return max(counts, key=counts.get) if counts else "none (every parameter trains)"
