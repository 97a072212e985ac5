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
    experts = moe_expert_targets(model)
    available = sorted({*module_suffixes(model), *experts})
    missing = [t for t in targets if not modules_named(model, t) and t not in experts]
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
    if getattr(peft_config, "target_modules", None) == "all-linear" and (experts := moe_expert_targets(model)):
        # peft resolves all-linear on a transformers 5 mixture of experts as transformers 4 matched nn.Linear, router
        # included; adapting the router moves which experts every token reaches, so it is left out unless named.
        peft_config.target_modules = sorted(linear_layer_names(model, skip=peft_config.modules_to_save or ()) | experts)
        if getattr(peft_config, "lora_dropout", 0):
            raise FtuneError(
                f"method.dropout: peft's LoRA on the fused expert weights of this {model.config.model_type} model has no "
                "dropout, and all-linear includes them; set method.dropout: 0, or list target_modules without the experts "
                f"(e.g. [q_proj, k_proj, v_proj, o_proj])"
            )
    try:
        return get_peft_model(prepare_quantized(model), peft_config)
    except ValueError as exc:  # peft's own checks: block sizes that do not divide, unsupported layers...
        raise FtuneError(f"method: peft cannot apply {method} to this {model.config.model_type} model: {exc}") from exc


def moe_routers(model) -> list[str]:
    """Dotted names of the mixture-of-experts routers (transformers' ``*Router`` modules: Mixtral, Qwen3-MoE, ...)."""
    return [name for name, module in model.named_modules() if type(module).__name__.endswith("Router")]


def moe_expert_targets(model) -> set[str]:
    """The transformers 4 names peft maps onto a transformers 5 model's fused expert weights (Mixtral: w1, w2, w3;
    the Qwen-MoE/DeepSeek family: gate_proj, up_proj, down_proj), router excluded; empty for dense models."""
    try:  # peft's own conversion table (the lock pins the peft it was read from)
        from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN, _MOE_TARGET_MODULE_MAPPING
    except ImportError:
        return set()
    mapping = _MOE_TARGET_MODULE_MAPPING.get(_MODEL_TO_CONVERSION_PATTERN.get(model.config.model_type), {})
    routers = {name.rsplit(".", 1)[-1] for name in moe_routers(model)}
    return {old for old, new in mapping.items() if new.split(".")[0] not in routers}


def linear_layer_names(model, *, skip=()) -> set[str]:
    """Leaf names of the nn.Linear layers, without the LM head and the modules named in ``skip`` (task heads)."""
    from torch import nn

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear) and module is not head}
    return names - set(skip)


def adapted_modules(model) -> list[str]:
    """Leaf names of what a peft method wrapped (q_proj, ...; fused expert weights as experts.gate_up_proj, a router's
    weight as gate.weight); empty for methods that wrap nothing."""
    tuner = getattr(model, "base_model", None)
    names = [name.rsplit(".", 1)[-1] for name in getattr(tuner, "targeted_module_names", [])]
    names += [".".join(name.rsplit(".", 2)[-2:]) for name in getattr(tuner, "targeted_parameter_names", [])]
    return sorted(set(names))


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
