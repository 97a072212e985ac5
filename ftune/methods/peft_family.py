"""Methods backed by peft: a recipe section becomes a peft config, ``get_peft_model`` wraps the base.

The same save/load pair serves every peft method: adapter weights only, as safetensors.
"""

from __future__ import annotations

from pathlib import Path

from ftune.errors import FtuneError

PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS"}
LORA_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


def module_suffixes(model) -> list[str]:
    """Leaf names of the model's linear-like layers (what ``target_modules`` entries match)."""
    names = set()
    for name, module in model.named_modules():
        if hasattr(module, "weight") and getattr(module.weight, "ndim", 0) == 2 and "." in name:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_target_modules(model, targets: list[str] | str, key: str = "method.target_modules") -> None:
    """Every entry must match some module: a partial typo must not silently train fewer layers."""
    if isinstance(targets, str):
        return
    available = module_suffixes(model)
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n, _ in model.named_modules())]
    if missing:
        raise FtuneError(
            f"{key}: {', '.join(repr(m) for m in missing)} match no module of this model; available: {', '.join(available)}"
        )


def _prepare_quantized(model):
    if getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training

        # Gradient checkpointing is decided by the Trainer from the recipe, not here.
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def wrap_with_peft(model, peft_config):
    from peft import get_peft_model

    return get_peft_model(_prepare_quantized(model), peft_config)


def apply_lora(model, config, task: str):
    from peft import LoraConfig

    check_target_modules(model, config.target_modules)
    if config.modules_to_save:
        check_target_modules(model, config.modules_to_save, "method.modules_to_save")
    peft_config = LoraConfig(
        task_type=PEFT_TASK_TYPES[task],
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        bias=config.bias,
        modules_to_save=list(config.modules_to_save) or None,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        init_lora_weights=LORA_INIT[config.init],
    )
    return wrap_with_peft(model, peft_config)


def save_peft(model, directory: Path) -> None:
    model.save_pretrained(directory, safe_serialization=True)


def load_peft(load_base, directory: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(), directory)
