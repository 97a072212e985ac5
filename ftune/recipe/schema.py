"""The recipe schema: every section a fine-tuning job is described by, validated once at the edge.

Field descriptions are written here once and reused by ``ftune validate`` output and the docs.
Cross-field rules live in the model that owns the fields and say how to fix the recipe.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ftune.recipe.methods import CAUSAL_LM, CLASSIFICATION, MethodConfig, Strict, method_class

DType = Literal["auto", "float32", "bfloat16", "float16"]
BUILTIN_MODELS = ("smollm2-135m-instruct",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _existing_path(value: str, what: str) -> str:
    path = Path(value).expanduser()
    if not path.exists():
        raise ValueError(f"{what} '{value}' does not exist (relative paths are read from the current directory)")
    return str(path.resolve())


class ModelConfig(Strict):
    name_or_path: str = Field(
        "smollm2-135m-instruct",
        description="Built-in alias (smollm2-135m-instruct), hub id (org/name), local model directory, or .gguf file.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when loading from the hub.")
    dtype: DType = Field("auto", description="Weight dtype: auto picks bfloat16 on GPUs that support it, float32 on CPU.")
    trust_remote_code: bool = Field(False, description="Run modelling code shipped with a hub model. Off unless you trust it.")
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="Attention kernel.")

    @field_validator("name_or_path")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value in BUILTIN_MODELS:
            return value
        looks_local = value.startswith((".", "/", "~")) or value.endswith(".gguf") or Path(value).expanduser().exists()
        if looks_local:
            return _existing_path(value, "model path")
        if not _HUB_ID.match(value):
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

    @model_validator(mode="after")
    def _options_match_bits(self) -> QuantizationConfig:
        # Compare with defaults, not with "was it written": a resolved recipe spells every default out.
        changed = {name for name, field in self.model_fields.items() if getattr(self, name) != field.default} - {"bits"}
        four_bit_only = changed & {"quant_type", "double_quant", "compute_dtype"}
        if self.bits == 8 and four_bit_only:
            raise ValueError(f"{', '.join(sorted(four_bit_only))} only apply to bits: 4; remove them or set bits: 4")
        if self.bits is None and changed:
            raise ValueError(f"{', '.join(sorted(changed))} set but bits is null; set bits: 4 or bits: 8, or remove them")
        return self


class DatasetSource(Strict):
    path: str = Field(description="Local .jsonl or .json file.")
    format: Literal["auto", "alpaca", "messages"] = Field(
        "auto", description="Row format: alpaca (instruction/input/output), messages (role/content list); auto detects."
    )

    @field_validator("path")
    @classmethod
    def _exists(cls, value: str) -> str:
        resolved = _existing_path(value, "dataset file")
        if not resolved.endswith((".jsonl", ".json")):
            raise ValueError(f"'{value}' is not a .jsonl or .json file")
        return resolved


def _as_sources(value: object) -> object:
    """Allow ``train: file.jsonl`` as shorthand for ``train: [{path: file.jsonl}]``."""
    if isinstance(value, str):
        return [{"path": value}]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return [{"path": item} if isinstance(item, str) else item for item in value]
    return value


class DataConfig(Strict):
    train: list[DatasetSource] = Field(description="Training files (a path, or a list of {path, format}).")
    eval: list[DatasetSource] = Field(default_factory=list, description="Held-out files; empty = carve eval_split from train.")
    eval_split: float = Field(0.1, ge=0, lt=1, description="Share of train held out for eval when no eval file is given.")
    max_length: int = Field(1024, gt=8, description="Tokens per example; longer examples are truncated (counted in the log).")
    train_on_prompt: bool = Field(False, description="Also train on prompt tokens; default trains on responses only.")
    system_prompt: str | None = Field(None, description="System message prepended to every conversation that has none.")
    seed: int = Field(42, description="Seed of the train/eval carve-out.")

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _coerce_sources(cls, value: object) -> object:
        return _as_sources(value)

    @model_validator(mode="after")
    def _has_eval_source(self) -> DataConfig:
        if not self.eval and self.eval_split == 0:
            raise ValueError("no eval data: give data.eval files or a data.eval_split above 0")
        return self


OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd")


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
    optimizer: Literal[OPTIMIZERS] = Field("adamw_torch", description="Optimizer; *_8bit and paged_* use bitsandbytes.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Autocast precision; bf16 speeds up CPUs with AVX512-BF16 and modern GPUs.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, ~30% slower.")
    logging_steps: int = Field(5, gt=0, description="Log loss every N optimizer steps.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps; null = only at the end.")
    save_steps: int = Field(50, gt=0, description="Checkpoint every N steps (what --resume continues from).")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept on disk.")
    seed: int = Field(42, description="Seed for initialisation and data order.")


class EvaluationConfig(Strict):
    max_new_tokens: int = Field(32, gt=0, description="Cap on generated tokens per prompt.")
    batch_size: int = Field(16, gt=0, description="Prompts generated per batch.")
    max_samples: int | None = Field(None, gt=0, description="Score at most this many eval examples.")


class Recipe(Strict):
    task: Literal["causal_lm", "classification"] = Field(CAUSAL_LM, description="What the model learns.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    method: MethodConfig
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    output_dir: str = Field(description="Run directory written by ftune train.")

    @model_validator(mode="after")
    def _method_fits(self) -> Recipe:
        cls = method_class(self.method.name)
        name = self.method.name
        if self.task not in cls.tasks:
            raise ValueError(f"method '{name}' does not support task '{self.task}'; supported: {', '.join(sorted(cls.tasks))}")
        if self.quantization.bits and not cls.quantized_base:
            raise ValueError(
                f"method '{name}' cannot train a {self.quantization.bits}-bit quantized base (quantized weights have no gradients); "
                "use method: lora for QLoRA, or remove the quantization section"
            )
        if self.training.gradient_checkpointing and not cls.gradient_checkpointing:
            raise ValueError(f"method '{name}' does not work with gradient checkpointing; set training.gradient_checkpointing: false")
        return self

    @property
    def is_classification(self) -> bool:
        return self.task == CLASSIFICATION
