"""Methods backed by peft: a recipe section becomes a peft config, ``get_peft_model`` wraps the base.

Each method contributes one builder ``(method config, task, model) -> peft config``; ``peft_apply``
turns a builder into the method's apply step (target check, quantized-base preparation, wrapping).
The same save/load pair serves every peft method: adapter weights only, as safetensors. LoRA's
own variants live in ``lora.py``, the prompt-learning methods in ``prompt.py``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

from ftune.errors import FtuneError
from ftune.methods.heads import task_head_names
from ftune.recipe.tasks import TASKS

PEFT_TASK_TYPES = {task: spec.peft_task_type for task, spec in TASKS.items()}
# Set on a wrapped model whose adapter must be converted at save time (PiSSA/OLoRA): the folder
# holding the adapter as initialised, before any training step.
INITIAL_ADAPTER_ATTR = "ftune_initial_adapter"

Builder = Callable[[Any, str, Any], Any]  # (method config, task, base model) -> peft config


def module_suffixes(model) -> list[str]:
    """Leaf names of the model's linear-like layers (what ``target_modules`` entries match)."""
    names = set()
    for name, module in model.named_modules():
        if hasattr(module, "weight") and getattr(module.weight, "ndim", 0) == 2 and "." in name:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def modules_named(model, wanted: str) -> list:
    """Modules whose dotted name is ``wanted`` or ends with ``.wanted``: how recipe module names match."""
    return [module for name, module in model.named_modules() if name == wanted or name.endswith("." + wanted)]


def check_target_modules(model, targets, key: str = "method.target_modules") -> None:
    """Every entry must match some module: a partial typo must not silently train fewer layers."""
    if targets is None or isinstance(targets, str):
        return
    available = module_suffixes(model)
    missing = [t for t in targets if not modules_named(model, t)]
    if missing:
        raise FtuneError(
            f"{key}: {', '.join(repr(m) for m in sorted(missing))} match no module of this model; available: {', '.join(available)}"
        )


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_quantized(model):
    if is_quantized(model):
        from peft import prepare_model_for_kbit_training

        from ftune.model import use_the_trainable_4bit_kernel

        use_the_trainable_4bit_kernel(model)  # a base loaded outside load_base_model
        # Gradient checkpointing is decided by the Trainer from the recipe, not here.
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def wrap_with_peft(model, peft_config, method: str):
    from peft import get_peft_model

    check_target_modules(model, getattr(peft_config, "target_modules", None))
    try:
        return get_peft_model(prepare_quantized(model), peft_config)
    except ValueError as exc:  # peft's own checks: block sizes that do not divide, unsupported layers...
        raise FtuneError(f"method: peft cannot apply {method} to this {model.config.model_type} model: {exc}") from exc


def peft_apply(build: Builder):
    """The apply step of a method whose peft config ``build`` makes."""

    def apply(model, config, task: str):
        return wrap_with_peft(model, build(config, task, model), config.name)

    apply.__name__ = f"apply_{build.__name__.removesuffix('_config')}"
    return apply


def targets(config) -> list[str] | str:
    return list(config.target_modules) if isinstance(config.target_modules, list) else config.target_modules


def heads_to_save(model, task: str) -> list[str] | None:
    # peft's SEQ_CLS task type already saves "classifier"/"score"; naming them also covers pre_classifier.
    return task_head_names(model, task) or None


def ia3_config(config, task: str, model):
    from peft import IA3Config

    try:  # a private table of peft's; if it moves, every model needs explicit targets
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as DEFAULTS
    except ImportError:
        DEFAULTS = {}

    if config.target_modules is None and model.config.model_type not in DEFAULTS:
        raise FtuneError(
            f"method.target_modules: peft has no (IA)^3 default for {model.config.model_type}; list the key/value and "
            f"feed-forward modules, e.g. target_modules: [k_proj, v_proj, down_proj] with feedforward_modules: [down_proj]"
        )
    explicit = config.target_modules is not None
    return IA3Config(
        task_type=PEFT_TASK_TYPES[task],
        target_modules=targets(config) if explicit else None,
        feedforward_modules=list(config.feedforward_modules or []) if explicit else None,
        modules_to_save=heads_to_save(model, task),
    )


def loha_config(config, task: str, model):
    from peft import LoHaConfig

    return LoHaConfig(
        task_type=PEFT_TASK_TYPES[task], r=config.r, alpha=config.alpha, rank_dropout=config.rank_dropout,
        module_dropout=config.module_dropout, target_modules=targets(config), modules_to_save=heads_to_save(model, task),
    )


def lokr_config(config, task: str, model):
    from peft import LoKrConfig

    return LoKrConfig(
        task_type=PEFT_TASK_TYPES[task], r=config.r, alpha=config.alpha, rank_dropout=config.rank_dropout,
        module_dropout=config.module_dropout, decompose_both=config.decompose_both, decompose_factor=config.decompose_factor,
        target_modules=targets(config), modules_to_save=heads_to_save(model, task),
    )


def oft_config(config, task: str, model):
    from peft import OFTConfig

    return OFTConfig(
        task_type=PEFT_TASK_TYPES[task], r=0, oft_block_size=config.block_size, coft=config.coft, eps=config.eps,
        block_share=config.block_share, module_dropout=config.module_dropout, target_modules=targets(config),
        modules_to_save=heads_to_save(model, task),
    )


def boft_config(config, task: str, model):
    from peft import BOFTConfig

    return BOFTConfig(
        task_type=PEFT_TASK_TYPES[task], boft_block_size=config.block_size, boft_block_num=config.block_num,
        boft_n_butterfly_factor=config.n_butterfly_factor, boft_dropout=config.dropout, target_modules=targets(config),
        modules_to_save=heads_to_save(model, task),
    )


def vera_config(config, task: str, model):
    from peft import VeraConfig

    return VeraConfig(
        task_type=PEFT_TASK_TYPES[task], r=config.r, d_initial=config.d_initial, vera_dropout=config.dropout,
        projection_prng_key=config.projection_prng_key, save_projection=config.save_projection,
        target_modules=targets(config), modules_to_save=heads_to_save(model, task),
    )


def save_peft(model, directory: Path) -> None:
    initial = getattr(model, INITIAL_ADAPTER_ATTR, None)
    # PiSSA/OLoRA moved part of the base weights into the adapter; converting against the initial
    # adapter yields a plain LoRA (rank 2r) that applies to the original, unmodified base.
    with warnings.catch_warnings():
        # AdaLoRA stores ranks pruned to nothing as 0-sized tensors, which peft mistakes for unsharded ZeRO-3/FSDP shards.
        warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
        # The conversion loads the initial adapter beside the trained one, which peft warns about; converting is its advice.
        warnings.filterwarnings("ignore", message=r"(PiSSA|OLoRA) changes the base weights")
        model.save_pretrained(
            directory, safe_serialization=True, path_initial_model_for_weight_conversion=str(initial) if initial else None
        )


def load_peft(load_base, directory: Path):
    from peft import PeftModel

    with warnings.catch_warnings():
        # AdaLoRA's rank_pattern names lora_E tensors, which peft's generic LoRA rank matching does not know;
        # AdaLoRA's own loader applies it.
        warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
        return PeftModel.from_pretrained(load_base(), directory)
