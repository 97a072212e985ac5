"""Methods stage: how a loaded base model is wrapped for training, saved, and loaded back.

``METHODS`` maps each ``method.name`` of the recipe to its implementation; adding a method is one
module plus one row here (and its config class in ``ftune.recipe.methods``). Nothing else in ftune
branches on the method name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ftune.methods import adapter, freeze, full, lora, mam, prompt, unipelt
from ftune.methods.peft_family import boft_config, ia3_config, load_peft, loha_config, lokr_config, oft_config, peft_apply, save_peft, vera_config

ApplyFn = Callable[[Any, Any, str], Any]  # (base model, method config, task) -> trainable model
SaveFn = Callable[[Any, Path], None]  # (trained model, directory)
LoadFn = Callable[[Callable[[], Any], Path], Any]  # (base model loader, directory) -> model ready for inference


@dataclass(frozen=True)
class MethodImpl:
    apply: ApplyFn
    save: SaveFn
    load: LoadFn
    callbacks: Callable[[Any, Any, Any], list] = lambda model, config, run: []  # Trainer callbacks the method needs


METHODS: dict[str, MethodImpl] = {
    "full": MethodImpl(full.apply_full, full.save_full, full.load_full),
    "freeze": MethodImpl(freeze.apply_freeze, full.save_full, full.load_full),
    "bitfit": MethodImpl(freeze.apply_bitfit, full.save_full, full.load_full),
    "lora": MethodImpl(lora.apply_lora, save_peft, load_peft),
    "adalora": MethodImpl(lora.apply_adalora, save_peft, load_peft, lora.adalora_callbacks),
    "ia3": MethodImpl(peft_apply(ia3_config), save_peft, load_peft),
    "loha": MethodImpl(peft_apply(loha_config), save_peft, load_peft),
    "lokr": MethodImpl(peft_apply(lokr_config), save_peft, load_peft),
    "oft": MethodImpl(peft_apply(oft_config), save_peft, load_peft),
    "boft": MethodImpl(peft_apply(boft_config), save_peft, load_peft),
    "vera": MethodImpl(peft_apply(vera_config), save_peft, load_peft),
    "prefix": MethodImpl(prompt.apply_prefix_method(prompt.prefix_config), save_peft, prompt.load_prefix),
    "prompt": MethodImpl(prompt.apply_soft_prompt_method(prompt.prompt_config), save_peft, prompt.load_soft_prompt),
    "ptuning": MethodImpl(prompt.apply_soft_prompt_method(prompt.ptuning_config), save_peft, prompt.load_soft_prompt),
    "ptuning_v2": MethodImpl(prompt.apply_prefix_method(prompt.ptuning_v2_config), save_peft, prompt.load_prefix),
    "adapter": MethodImpl(adapter.apply_adapter, adapter.save_adapter, adapter.load_adapter),
    "mam": MethodImpl(mam.apply_mam, mam.save_mam, mam.load_mam),
    "unipelt": MethodImpl(unipelt.apply_unipelt, unipelt.save_unipelt, unipelt.load_unipelt),
}


def apply_method(model, method_config, task: str):
    return METHODS[method_config.name].apply(model, method_config, task)


def method_callbacks(model, method_config, run) -> list:
    return METHODS[method_config.name].callbacks(model, method_config, run)


def save_method_artifact(model, method_name: str, directory: Path) -> None:
    METHODS[method_name].save(model, directory)


def load_trained(method_name: str, load_base: Callable[[], Any], directory: Path):
    return METHODS[method_name].load(load_base, directory)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if getattr(param, "quant_state", None) is not None:  # bitsandbytes 4-bit: two values per stored uint8
            count *= 2
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total
