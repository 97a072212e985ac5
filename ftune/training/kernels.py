"""training.kernels: Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) on CUDA.

Liger patches the loaded model in place when the Trainer starts (transformers' ``use_liger_kernel``). Its fused
linear cross-entropy computes the loss from the hidden states in chunks and never materialises the logits, which
is the GPU counterpart of ``label_positions``: with Liger the model computes its own loss, so the labelled-positions
loss is off. Triton kernels need a CUDA GPU; on CPU ``auto`` means none and ``liger`` is refused.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from ftune.families import LIGER_MODEL_TYPES
from ftune.recipe.stages import liger_stage_blocker


@dataclass(frozen=True)
class KernelChoice:
    liger: bool
    reason: str


def liger_kernel_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


# What Liger's instance patch rebinds the forward of, in every decoder layer.
LIGER_PATCHED_SUBLAYERS = ("mlp", "input_layernorm", "post_attention_layernorm")


def wrapped_sublayers(model) -> list[str]:
    """The sublayers Liger patches that a method replaced with a module of its own (a parallel adapter's wrapper)."""
    from ftune.training.compilation import decoder_layers

    wrapped = set()
    for layer in decoder_layers(model):
        for name in LIGER_PATCHED_SUBLAYERS:
            sublayer = getattr(layer, name, None)
            if sublayer is not None and not type(sublayer).__module__.startswith("transformers."):
                wrapped.add(f"{name} ({type(sublayer).__name__})")
    return sorted(wrapped)


def liger_blocker(model, *, stage: str, cuda: bool) -> str | None:
    """Why Liger's kernels cannot serve this run, or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = base.config.model_type
    if not cuda:
        return "Liger's kernels are Triton kernels for CUDA GPUs and this machine has none"
    if blocker := liger_stage_blocker(stage):
        return blocker
    if model_type not in LIGER_MODEL_TYPES:
        return f"Liger has no kernels for model_type {model_type} (it has {', '.join(sorted(LIGER_MODEL_TYPES))})"
    if wrapped := wrapped_sublayers(model):
        return f"the method wraps {', '.join(wrapped)}, whose forward Liger's patch would replace (dropping the method)"
    if not liger_kernel_installed():
        return "the liger-kernel package is not installed (pip install liger-kernel)"
    return None


def choose_kernels(model, recipe, *, cuda: bool) -> KernelChoice:
    """What ``training.kernels`` means for this model on this machine; ``liger`` that cannot run is an error."""
    from ftune.errors import FtuneError

    setting = recipe.training.kernels
    if setting == "none":
        return KernelChoice(False, "training.kernels: none")
    blocker = liger_blocker(model, stage=recipe.stage, cuda=cuda)
    if blocker is None:
        return KernelChoice(True, f"training.kernels: {setting}")
    if setting == "liger":
        raise FtuneError(f"training.kernels: liger, but {blocker}; set training.kernels: auto or none")
    return KernelChoice(False, f"auto: {blocker}")
