"""Methods stage: how a loaded base model is wrapped for training, saved, and loaded back.

``METHODS`` maps each ``method.name`` of the recipe to its implementation; adding a method is one
module plus one row here (and its config class in ``ftune.recipe.methods``). Nothing else in ftune
branches on the method name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ftune.methods import full, peft_family

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
    "lora": MethodImpl(peft_family.apply_lora, peft_family.save_peft, peft_family.load_peft),
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
        if param.__class__.__name__ == "Params4bit":
            count *= 2  # two 4-bit values per stored uint8
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total
