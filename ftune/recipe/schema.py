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
BUILTIN_MODELS = ("smollm2-135m-instruct", "all-minilm-l6-v2")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _existing_path(value: str, what: str) -> str:
    path = Path(value).expanduser()
    if not path.exists():
        raise ValueError(f"{what} '{value}' does not exist (relative paths are read from the current directory)")
    return str(path.resolve())


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


# Fields each row format reads; ``columns:`` maps them to a dataset's own column names. The
# converters live in ftune.data.formats, which checks at import that it covers exactly these.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output", "system"),
    "sharegpt": ("conversations", "system"),
    "messages": ("messages",),
    "text": ("text",),
    "classification": ("text", "label"),
    "preference": ("prompt", "chosen", "rejected", "system"),
}
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
CHAT_TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "configs" / "chat_templates"


def chat_template_names() -> list[str]:
    return sorted(path.stem for path in CHAT_TEMPLATE_DIR.glob("*.jinja"))


def is_inline_template(value: str) -> bool:
    return "{{" in value or "{%" in value


class DatasetSource(Strict):
    path: str | None = Field(None, description="Local .jsonl, .json, .csv or .parquet file, or a directory of them.")
    hub: str | None = Field(None, description="Hub dataset id (org/name), read with datasets.load_dataset; needs network.")
    config: str | None = Field(None, description="Hub dataset configuration (subset) name.")
    split: str | None = Field(None, description="Hub dataset split, e.g. train or train[:2000]; default train.")
    revision: str | None = Field(None, description="Hub dataset revision (branch, tag or commit).")
    format: Literal[("auto", *FORMAT_FIELDS)] = Field(
        "auto",
        description="Row format: alpaca (instruction/input/output), sharegpt (conversations from/value), messages "
        "(role/content list), text (raw text, every token trained), classification (text/label), preference "
        "(prompt/chosen/rejected); auto detects it from the columns.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="Map a format field to this dataset's column, e.g. {instruction: question, output: answer}."
    )
    weight: float | None = Field(None, gt=0, description="Training mix factor: 2 repeats every row twice, 0.5 keeps a seeded random half.")
    samples: int | None = Field(None, gt=0, description="Take exactly this many training rows (seeded; rows repeat if there are fewer).")

    @field_validator("path")
    @classmethod
    def _exists(cls, value: str | None) -> str | None:
        if value is None:
            return None
        resolved = Path(_existing_path(value, "dataset file"))
        if resolved.is_dir():
            if not any(p.suffix in DATA_SUFFIXES for p in resolved.iterdir() if p.is_file()):
                raise ValueError(f"directory '{value}' holds no {', '.join(DATA_SUFFIXES)} files")
        elif resolved.suffix not in DATA_SUFFIXES:
            raise ValueError(f"'{value}' is not a .jsonl, .json, .csv or .parquet file, nor a directory of them")
        return str(resolved)

    @field_validator("hub")
    @classmethod
    def _hub_id(cls, value: str | None) -> str | None:
        if value is not None and not _HUB_ID.match(value):
            raise ValueError(f"'{value}' is not a hub dataset id like org/name")
        return value

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, value: dict[str, str], info) -> dict[str, str]:
        name = info.data.get("format", "auto")
        fields = FORMAT_FIELDS[name] if name in FORMAT_FIELDS else tuple(dict.fromkeys(f for fs in FORMAT_FIELDS.values() for f in fs))
        unknown = [key for key in value if key not in fields]
        if unknown:
            raise ValueError(f"'{unknown[0]}' is not a field of format {name}; map one of: {', '.join(fields)}")
        return value

    @model_validator(mode="after")
    def _one_origin(self) -> DatasetSource:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give either path (a local file or directory) or hub (a dataset id), exactly one")
        hub_only = [name for name in ("config", "split", "revision") if getattr(self, name) is not None]
        if self.path is not None and hub_only:
            raise ValueError(f"{', '.join(hub_only)} only apply to hub datasets; remove them or use hub: instead of path:")
        if self.weight is not None and self.samples is not None:
            raise ValueError("weight and samples both set; pick one (weight scales the dataset, samples fixes its row count)")
        return self


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
    train: list[DatasetSource] = Field(description="Training data: a path, or a list of sources {path|hub, format, columns, weight|samples}.")
    eval: list[DatasetSource] = Field(default_factory=list, description="Held-out data; empty = carve eval_split from train.")
    eval_split: float | int = Field(
        0.1, description="Held out of train when no eval data is given: a fraction (0.1) or a row count (200); 0 = none."
    )
    max_length: int = Field(1024, gt=8, description="Tokens per example; longer ones are cut or dropped (see truncation), counted in the log.")
    truncation: Literal["truncate", "drop"] = Field("truncate", description="Examples over max_length: truncate them, or drop them.")
    packing: bool | Literal["auto"] = Field(
        "auto",
        description="Padding-free batches (positions restart per example, same loss): auto = per batch where the model supports "
        "it and it is cheaper (always with flash attention); true = every batch; false = dynamic padding.",
    )
    train_on_prompt: bool = Field(False, description="Also train on prompt tokens; default trains on responses only.")
    chat_template: str | None = Field(
        None,
        description="Chat template: a name in configs/chat_templates (chatml, llama3, alpaca), a .jinja file, or inline Jinja; "
        "default = the tokenizer's own.",
    )
    system_prompt: str | None = Field(None, description="System message prepended to every conversation that has none.")
    labels: list[str] | None = Field(
        None, description="Class names in id order (classification); rows with other labels are errors. Default: the labels in the data, sorted."
    )
    on_error: Literal["fail", "skip"] = Field("fail", description="Bad rows: fail listing the first 10, or skip them and report how many.")
    cache: bool = Field(True, description="Reuse tokenized data cached under $FTUNE_CACHE_DIR/data (keyed by data, tokenizer and options).")
    seed: int = Field(42, description="Seed of the train/eval carve-out and of dataset mixing.")

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _coerce_sources(cls, value: object) -> object:
        return _as_sources(value)

    @field_validator("train")
    @classmethod
    def _some_train(cls, value: list[DatasetSource]) -> list[DatasetSource]:
        if not value:
            raise ValueError("needs at least one training source")
        return value

    @field_validator("eval")
    @classmethod
    def _eval_unmixed(cls, value: list[DatasetSource]) -> list[DatasetSource]:
        for index, source in enumerate(value):
            if source.weight is not None or source.samples is not None:
                raise ValueError(f"entry {index}: weight and samples mix training data; remove them from eval entries")
        return value

    @field_validator("eval_split", mode="before")
    @classmethod
    def _fraction_or_count(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError(f"must be a fraction (0.1) or a row count (200), got {value!r}")
        if isinstance(value, float) and not 0 <= value < 1:
            raise ValueError(f"a fraction must be in [0, 1), got {value}; write a whole number (e.g. 200) to hold out a row count")
        if isinstance(value, int) and value < 0:
            raise ValueError(f"a row count must be 0 or more, got {value}")
        return value

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (len(value) < 2 or len(set(value)) != len(value)):
            raise ValueError("needs at least two distinct class names, in id order")
        return value

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        if value is None or is_inline_template(value) or value in chat_template_names():
            return value
        if Path(value).expanduser().is_file():
            return str(Path(value).expanduser().resolve())
        raise ValueError(
            f"'{value}' is neither a template name ({', '.join(chat_template_names())}), an existing .jinja file, nor inline Jinja"
        )

    @model_validator(mode="after")
    def _has_eval_source(self) -> DataConfig:
        if not self.eval and self.eval_split == 0:
            raise ValueError("no eval data: give data.eval files or a data.eval_split above 0")
        return self

    def task_problem(self, task: str) -> str | None:
        """Why this data cannot train ``task`` (a one-line fix), or None; the Recipe validator reports it."""
        entries = [(f"data.{split}.{i}", s) for split in ("train", "eval") for i, s in enumerate(getattr(self, split))]
        if task == CLASSIFICATION:
            for key, source in entries:
                if source.format not in ("auto", "classification"):
                    return f"{key}.format: '{source.format}' rows cannot train task classification; use format: classification (text, label)"
            if self.packing is True:
                return "data.packing: true does not apply to task classification (each text is classified alone); remove it"
            return None
        for key, source in entries:
            if source.format == "classification":
                return f"{key}.format: classification rows need task: classification (now '{task}'); set task: classification"
        if self.labels is not None:
            return f"data.labels only applies to task: classification (now '{task}'); remove it or set task: classification"
        return None


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
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto",
        description="Autocast precision, resolved once at launch: auto = bf16 on GPUs and CPUs with native bfloat16 "
        "(AVX512-BF16/AMX), fp16 on GPUs without it, else no (float32); bf16 on other CPUs runs ~50x slower.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, ~30% slower.")
    threads: int | None = Field(
        None, ge=1, description="CPU threads for torch's kernels; null = the CPUs this process may use (affinity mask, cgroup quota)."
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
    task: Literal["causal_lm", "classification"] = Field(CAUSAL_LM, description="What the model learns.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    method: MethodConfig
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
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
