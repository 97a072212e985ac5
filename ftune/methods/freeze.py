"""Selective methods: train a chosen subset of the model's own parameters and freeze the rest.

``freeze`` trains the top transformer layers (plus named extra modules), ``bitfit`` trains only bias
terms. Both change base weights in place, so they save complete weights exactly as full
fine-tuning does; a classification head, freshly initialised, always trains.
"""

from __future__ import annotations

from ftune.errors import FtuneError
from ftune.methods.heads import task_head_names, unfreeze_task_head
from ftune.methods.peft_family import modules_named


def transformer_layers(model) -> tuple[str, list]:
    """(name, layers) of the model's stack of transformer blocks: the ModuleList holding the most parameters."""
    from torch import nn

    stacks = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and len(module)]
    if not stacks:
        raise FtuneError(
            f"method: freeze needs numbered transformer layers and {type(model).__name__} has none; use method: lora or full"
        )
    name, stack = max(stacks, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    return name, list(stack)


def chosen_layer_indices(count: int, choice: int | list[int]) -> list[int]:
    """Indices (0 = bottom) of the layers ``method.trainable_layers`` selects out of ``count``."""
    if isinstance(choice, int):
        if choice > count:
            raise FtuneError(f"method.trainable_layers: {choice} is more than the model's {count} layers; use at most {count} (or method: full)")
        return list(range(count - choice, count))
    out_of_range = [i for i in choice if not -count <= i < count]
    if out_of_range:
        raise FtuneError(
            f"method.trainable_layers: layer {out_of_range[0]} does not exist; this model has {count} layers "
            f"(indices 0..{count - 1}, or -1..-{count} from the top)"
        )
    indices = sorted(i % count for i in choice)
    if len(set(indices)) != len(indices):
        raise FtuneError(f"method.trainable_layers: {choice} names a layer twice (negative indices count from the top)")
    return indices


def find_modules(model, names: list[str], key: str) -> list:
    """Modules whose qualified name is, or ends with, each entry; an entry matching nothing is an error."""
    found, missing = [], []
    for wanted in names:
        matches = modules_named(model, wanted)
        if matches:
            found.extend(matches)
        else:
            missing.append(wanted)
    if missing:
        children = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n and not n.rsplit(".", 1)[-1].isdigit()})
        raise FtuneError(f"{key}: {', '.join(repr(m) for m in missing)} match no module of this model; available: {', '.join(children)}")
    return found


def freeze_all(model) -> None:
    for param in model.parameters():
        param.requires_grad_(False)


def apply_freeze(model, config, task: str):
    _, layers = transformer_layers(model)
    chosen = chosen_layer_indices(len(layers), config.trainable_layers)
    extras = find_modules(model, list(config.extra_modules), "method.extra_modules")
    freeze_all(model)
    for module in [layers[i] for i in chosen] + extras:
        for param in module.parameters():
            param.requires_grad_(True)
    unfreeze_task_head(model, task)
    return model


def apply_bitfit(model, config, task: str):
    heads = tuple(f"{name}." for name in task_head_names(model, task))
    biases = [param for name, param in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias" and not name.startswith(heads)]
    if not biases:
        model_type = getattr(model.config, "model_type", type(model).__name__)
        raise FtuneError(
            f"method: bitfit trains bias terms only, and this {model_type} model has none (Llama-family models have no biases); "
            "use method: lora or method: freeze"
        )
    freeze_all(model)
    for param in biases:
        param.requires_grad_(True)
    unfreeze_task_head(model, task)
    return model
