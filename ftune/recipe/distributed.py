"""The ``distributed:`` section: how the processes of a launch (``--nproc``, torchrun, accelerate launch) share a run.

``ddp`` keeps a whole copy of the model in every process and averages gradients; ``fsdp`` (torch FSDP2 through
accelerate) and ``deepspeed`` (ZeRO) shard the trainable state across processes so a model that does not fit one
device trains on several. The process count comes from the launch, never from the recipe, so one recipe runs on
one process or many. Every rule here is checked by ``ftune validate`` without importing torch.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import Field

from ftune.recipe.methods import Strict, method_class

StrategyName = Literal["auto", "ddp", "fsdp", "deepspeed"]
# ZeRO-Offload refuses an optimizer the Trainer built (DeepSpeed raises unless it is its own CPU Adam), so the
# DeepSpeed config names AdamW and DeepSpeed runs its CPU AdamW: the same update as these, at their settings.
DEEPSPEED_CPU_ADAM_REPLACES = frozenset({"adamw_torch_fused", "adamw_torch"})


class FsdpConfig(Strict):
    sharding: Literal["full", "grad_op", "hybrid"] = Field(
        "full",
        description="full: parameters, gradients and optimizer state sharded, layers gathered for their forward and backward "
        "(least memory, ZeRO-3 like); grad_op: parameters stay gathered between forward and backward (less traffic, "
        "ZeRO-2 like); hybrid: shard within a node, replicate across nodes (needs FSDP1, which transformers 5 dropped).",
    )
    cpu_offload: bool = Field(False, description="Keep sharded parameters and optimizer state in CPU memory between uses (GPU only).")
    wrap: list[str] | Literal["auto"] = Field(
        "auto", description="Module classes each made one FSDP unit; auto = the model's decoder layer class (its _no_split_modules)."
    )


class DeepSpeedConfig(Strict):
    zero_stage: Literal[2, 3] = Field(
        2, description="ZeRO stage: 2 shards gradients and optimizer state; 3 shards the parameters too (for models that do not fit one GPU)."
    )
    offload_optimizer: bool = Field(False, description="Optimizer state and step in CPU memory (ZeRO-Offload).")
    offload_params: bool = Field(False, description="Parameters in CPU memory between uses (zero_stage: 3 only).")


class DistributedConfig(Strict):
    strategy: StrategyName = Field(
        "auto",
        description="How several processes share the run: auto = ddp when launched on several processes; ddp = a whole model "
        "per process, gradients averaged; fsdp = torch FSDP (sharded); deepspeed = DeepSpeed ZeRO (sharded, CUDA only).",
    )
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)

    @property
    def shards_parameters(self) -> bool:
        """Whether each process holds only a shard of the weights: a quantized base must then store its 4-bit blocks in
        the dtype the other weights are sharded in."""
        return self.strategy == "fsdp" or (self.strategy == "deepspeed" and self.deepspeed.zero_stage == 3)


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def distributed_problems(recipe) -> list[str]:
    """Why the ``distributed:`` section does not fit the rest of the recipe (each with its fix), or []."""
    section = recipe.distributed
    strategy, problems = section.strategy, []
    for name, config, defaults in (("fsdp", section.fsdp, FsdpConfig()), ("deepspeed", section.deepspeed, DeepSpeedConfig())):
        changed = sorted(key for key in type(config).model_fields if getattr(config, key) != getattr(defaults, key))
        if changed and strategy != name:
            problems.append(f"distributed.{name}.{', '.join(changed)} set but distributed.strategy is {strategy}; "
                            f"set distributed.strategy: {name} or remove them")
    if strategy == "fsdp":
        if section.fsdp.sharding == "hybrid":
            problems.append("distributed.fsdp.sharding: hybrid needs FSDP1, which transformers 5 removed; use full (or "
                            "strategy: deepspeed with zero_stage: 3 across nodes)")
        if not method_class(recipe.method.name).fsdp:
            problems.append(f"distributed.strategy: fsdp does not support method '{recipe.method.name}' (peft's prompt encoder sits "
                            "outside the layers FSDP shards and breaks after the first save); use strategy: ddp, or method: lora or unipelt")
    if strategy == "deepspeed":
        if not deepspeed_installed():
            problems.append("distributed.strategy: deepspeed needs the deepspeed package: pip install deepspeed (CUDA GPUs only); "
                            "or use strategy: fsdp")
        if section.deepspeed.offload_optimizer and recipe.training.optimizer not in DEEPSPEED_CPU_ADAM_REPLACES:
            problems.append(f"distributed.deepspeed.offload_optimizer steps the optimizer on the CPU with DeepSpeed's own AdamW, "
                            f"not training.optimizer: {recipe.training.optimizer}; set training.optimizer: adamw_torch_fused, "
                            "or offload_optimizer: false")
        if section.deepspeed.offload_params and section.deepspeed.zero_stage != 3:
            problems.append("distributed.deepspeed.offload_params needs zero_stage: 3 (stage 2 keeps whole parameters on every GPU)")
    bits = recipe.quantization.bits
    if section.shards_parameters and bits == 8:
        problems.append(f"quantization.bits: 8 cannot be sharded by {describe_strategy(section)} (int8 weights and their outlier "
                        "state are not splittable tensors); use bits: 4 with quantization.quant_storage: bfloat16, or strategy: ddp")
    if section.shards_parameters and bits == 4 and recipe.quantization.quant_storage == "uint8":
        problems.append(f"quantization.bits: 4 under {describe_strategy(section)} needs quantization.quant_storage: bfloat16 (or "
                        "the dtype of the other weights): the 4-bit blocks are sharded with the other weights only when stored in their dtype")
    return problems


def resolved_strategy(requested: str, world_size: int) -> str:
    """single, ddp, fsdp or deepspeed: what ``world_size`` processes run for ``distributed.strategy: requested``. Auto is
    ddp on several processes; on one, every strategy is a plain process (there is nothing to shard or average)."""
    if world_size <= 1:
        return "single"
    return "ddp" if requested == "auto" else requested


def describe_strategy(section: DistributedConfig, *, world_size: int | None = None) -> str:
    """One line: the strategy and its settings, as validate and train print it."""
    strategy = section.strategy
    if strategy == "auto":
        if world_size is None:
            return "auto (ddp when launched on several processes, else one process)"
        strategy = resolved_strategy(strategy, world_size)
    if strategy == "single":
        return "single process"
    if strategy == "ddp":
        return "ddp (a whole model per process, gradients averaged)"
    if strategy == "fsdp":
        fsdp = section.fsdp
        wrap = "the model's decoder layer" if fsdp.wrap == "auto" else ", ".join(fsdp.wrap)
        return f"fsdp ({fsdp.sharding} shard, one unit per {wrap}{', CPU offload' if fsdp.cpu_offload else ''})"
    ds = section.deepspeed
    offload = [part for part, on in (("optimizer", ds.offload_optimizer), ("parameters", ds.offload_params)) if on]
    return f"deepspeed (ZeRO stage {ds.zero_stage}{', offload ' + ' and '.join(offload) if offload else ''})"
