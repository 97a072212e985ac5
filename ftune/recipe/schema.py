"""The recipe schema: every section a fine-tuning job is described by, validated once at the edge.

Field descriptions are written here once and reused by ``ftune validate`` output and the docs.
Cross-field rules live in the model that owns the fields and say how to fix the recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ftune.recipe.data import DataConfig
from ftune.recipe.distributed import DistributedConfig, distributed_problems
from ftune.recipe.grpo import GrpoConfig
from ftune.recipe.methods import MethodConfig, Strict, method_class
from ftune.recipe.paths import HUB_ID, checks_paths, existing_path
from ftune.recipe.stages import SFT, PreferenceConfig, StageName, liger_stage_blocker, stage_problems
from ftune.recipe.tasks import CAUSAL_LM, CLASSIFICATION, TaskName
from ftune.recipe.tracking import TrackingConfig

DType = Literal["auto", "float32", "bfloat16", "float16"]
BUILTIN_MODELS = ("smollm2-135m-instruct", "all-minilm-l6-v2")


class ModelConfig(Strict):
    name_or_path: str = Field(
        "smollm2-135m-instruct",
        description="Built-in alias (smollm2-135m-instruct, all-minilm-l6-v2), hub id (org/name), local model directory, or .gguf file.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when loading from the hub.")
    dtype: DType = Field("auto", description="Weight dtype: auto picks bfloat16 on GPUs that support it, float32 on CPU.")
    trust_remote_code: bool = Field(False, description="Run modelling code shipped with a hub model. Off unless you trust it.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="Attention kernel: auto = flash_attention_2 where the flash-attn package, an Ampere+ GPU and 16-bit "
        "weights meet, else sdpa.",
    )

    @field_validator("name_or_path")
    @classmethod
    def _known_source(cls, value: str, info: ValidationInfo) -> str:
        if value in BUILTIN_MODELS or not checks_paths(info):
            return value
        looks_local = value.startswith((".", "/", "~")) or value.endswith(".gguf") or Path(value).expanduser().exists()
        if looks_local:
            return existing_path(value, "model path")
        if not HUB_ID.match(value):
            raise ValueError(
                f"'{value}' is neither a built-in model ({', '.join(BUILTIN_MODELS)}), a hub id like org/name, nor an existing path"
            )
        return value


class QuantizationConfig(Strict):
    bits: Literal[4, 8] | None = Field(None, description="Load the base in 4-bit (QLoRA) or 8-bit via bitsandbytes; null = no quantization.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; nf4 suits normally distributed weights.")
    double_quant: bool = Field(True, description="Quantize the 4-bit scales too (saves ~0.4 bits/param).")
    compute_dtype: DType = Field("auto", description="dtype of 4-bit matmuls; auto follows model.dtype.")
    int8_threshold: float = Field(6.0, gt=0, description="LLM.int8 outlier threshold for 8-bit loading.")
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8",
        description="dtype the packed 4-bit blocks are stored in; set it to the other weights' dtype (bfloat16) when FSDP or "
        "ZeRO-3 shards the model, so the 4-bit blocks are sharded with them.",
    )

    @model_validator(mode="after")
    def _options_match_bits(self) -> QuantizationConfig:
        # Compare with defaults, not with "was it written": a resolved recipe spells every default out.
        changed = {name for name, field in self.model_fields.items() if getattr(self, name) != field.default} - {"bits"}
        four_bit_only = changed & {"quant_type", "double_quant", "compute_dtype", "quant_storage"}
        if self.bits == 8 and four_bit_only:
            raise ValueError(f"{', '.join(sorted(four_bit_only))} only apply to bits: 4; remove them or set bits: 4")
        if self.bits is None and changed:
            raise ValueError(f"{', '.join(sorted(changed))} set but bits is null; set bits: 4 or bits: 8, or remove them")
        return self


# Each optimizer ``training.optimizer`` accepts, with the state it keeps in bytes per trained parameter (ftune plan's
# figure): AdamW's two float32 moments, 8-bit AdamW's two quantized ones, none for plain SGD; None = factored per matrix
# (Adafactor keeps a row and a column vector per matrix, sized by the plan from the shapes).
OPTIMIZERS: dict[str, int | None] = {
    "adamw_torch_fused": 8, "adamw_torch": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "paged_adamw_32bit": 8, "adafactor": None,
    "sgd": 0,
}


class TrainingConfig(Strict):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(4, gt=0, description="Examples per device per forward pass.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Forward passes per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate; 1e-4..3e-4 typical for LoRA, 1e-5 for full.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field("cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optimizer: Literal[tuple(OPTIMIZERS)] = Field(
        "adamw_torch_fused",
        description="Optimizer. adamw_torch_fused: torch's AdamW as one kernel over all tensors (CPU and GPU); adamw_torch: "
        "the same update tensor by tensor; *_8bit and paged_* use bitsandbytes.",
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto",
        description="Autocast precision, resolved once at launch: auto = bf16 on GPUs and CPUs with native bfloat16 "
        "(AVX512-BF16/AMX), fp16 on GPUs without it, else no (float32); bf16 on other CPUs runs ~50x slower.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, ~30% slower.")
    threads: int | None = Field(
        None, ge=1, description="CPU threads for torch's kernels; null = the CPUs this process may use (affinity mask, cgroup quota)."
    )
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile each decoder layer (inductor) for the training steps: true, false, or auto = compile "
        "when a few eager steps show the remaining steps save more time than compiling costs (the decision is printed).",
    )
    kernels: Literal["auto", "liger", "none"] = Field(
        "auto",
        description="Fused GPU kernels: liger = Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy; "
        "CUDA, the liger-kernel package, stages pretrain and sft); auto = liger where all of that holds, else none.",
    )
    logging_steps: int = Field(5, gt=0, description="Log loss every N optimizer steps.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps; null = only at the end.")
    save_steps: int = Field(50, gt=0, description="Checkpoint every N steps (what --resume continues from).")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept on disk.")
    seed: int = Field(42, description="Seed for initialisation and data order.")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: object) -> object:
        # YAML 1.1 reads unquoted no/off/false as the boolean False.
        return "no" if value is False else value


class EvaluationConfig(Strict):
    max_new_tokens: int = Field(32, gt=0, description="Cap on generated tokens per prompt.")
    batch_size: int = Field(16, gt=0, description="Prompts generated per batch.")
    max_samples: int | None = Field(None, gt=0, description="Score at most this many eval examples.")


class MergeConfig(Strict):
    base: Literal["full_precision", "dequantized"] = Field(
        "full_precision",
        description="Weights a quantized run's adapter is folded into: the original full-precision base (default), "
        "or the dequantized 4-bit base it was trained on (reproduces the trained model, quantization error included).",
    )
    tolerance: float | None = Field(
        None, gt=0, lt=1,
        description="Largest accepted merged-vs-adapter max logit difference, as a fraction of the largest absolute logit; "
        "null = by output dtype (float32 1e-5, float16 1e-2, bfloat16 1e-1; at least 2e-2 with base: dequantized).",
    )
    parity_samples: int = Field(4, gt=0, le=64, description="Eval examples the merged model is checked on.")


class Recipe(Strict):
    task: TaskName = Field(CAUSAL_LM, description="What the model learns.")
    stage: StageName = Field(SFT, description="Training stage: pretrain (every token of raw text, packed blocks), sft (responses of chat/instruction data), "
        "dpo or orpo (preference pairs), reward (a scoring head on pairs), grpo (online RL: sampled completions scored by grpo.rewards), "
        "kto (single completions labelled desirable or undesirable).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    method: MethodConfig
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    output_dir: str = Field(description="Run directory written by ftune train.")

    @model_validator(mode="after")
    def _method_fits(self) -> Recipe:
        cls = method_class(self.method.name)
        name = self.method.name
        if self.task not in cls.tasks:
            raise ValueError(f"method '{name}' does not support task '{self.task}'; supported: {', '.join(sorted(cls.tasks))}")
        bits = self.quantization.bits
        if bits and bits not in cls.quantized_base:
            other = [b for b in cls.quantized_base if b != bits]
            fix = f"use quantization.bits: {other[0]} or method: lora" if other else "use method: lora for QLoRA, or remove the quantization section"
            raise ValueError(f"quantization.bits: method '{name}' cannot train a {bits}-bit quantized base ({cls.quantized_note}); {fix}")
        if self.training.gradient_checkpointing and not cls.gradient_checkpointing:
            raise ValueError(f"method '{name}' does not work with gradient checkpointing; set training.gradient_checkpointing: false")
        problems = self.method.recipe_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _data_fits_task(self) -> Recipe:
        problem = self.data.task_problem(self.task)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _stage_and_distributed_fit(self) -> Recipe:
        problems = stage_problems(self) + distributed_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _compile_fits(self) -> Recipe:
        if self.training.compile is True and (blocker := self.compile_blocker):
            raise ValueError(f"training.compile: true, but {blocker}; set training.compile: auto or false")
        return self

    @property
    def compile_blocker(self) -> str | None:
        """Why this recipe's training cannot be compiled, decided from the recipe alone (``ftune validate`` reports it)."""
        if blocker := method_class(self.method.name).compile_blocker:
            return f"method {self.method.name}: {blocker}"
        if self.training.kernels == "liger":
            return "training.kernels: liger puts Triton kernels inside the layers (not measured compiled)"
        if self.quantization.bits:
            return f"a {self.quantization.bits}-bit bitsandbytes base breaks the graph at every quantized matmul"
        if self.distributed.strategy in ("fsdp", "deepspeed"):
            return f"distributed.strategy: {self.distributed.strategy} wraps the layers itself (not measured with compiled layers)"
        return None

    @model_validator(mode="after")
    def _kernels_fit(self) -> Recipe:
        if self.training.kernels == "liger" and (blocker := liger_stage_blocker(self.stage)):
            raise ValueError(f"training.kernels: liger, but {blocker}; set training.kernels: auto or none")
        return self

    @model_validator(mode="after")
    def _merge_base_fits(self) -> Recipe:
        if self.merge.base == "dequantized" and self.quantization.bits != 4:
            raise ValueError(
                "merge.base: 'dequantized' applies to 4-bit runs (quantization.bits: 4); use merge.base: full_precision "
                "(8-bit kernels do not compute with their dequantized weights, so merging into those gains nothing)"
            )
        return self

    @property
    def is_classification(self) -> bool:
        return self.task == CLASSIFICATION
