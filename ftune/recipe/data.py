"""Recipe schema of the ``data`` section: sources, row formats, chat template, lengths, splits and mixing."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ftune.recipe.methods import Strict
from ftune.recipe.paths import HUB_ID, checks_paths, existing_path
from ftune.recipe.tasks import CLASSIFICATION

# Fields each row format reads; ``columns:`` maps them to a dataset's own column names. The
# converters live in ftune.data.formats, which checks at import that it covers exactly these.
# A chat row (alpaca, sharegpt, messages) with a boolean ``kto_tag`` or ``label`` is a KTO row: its last reply labelled
# desirable (true) or undesirable (false), as LLaMA-Factory's KTO data writes it.
KTO_LABELS = ("kto_tag", "label")
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output", "system", *KTO_LABELS),
    "sharegpt": ("conversations", "system", "tools", *KTO_LABELS),
    "messages": ("messages", "tools", *KTO_LABELS),
    "text": ("text",),
    "classification": ("text", "label"),
    "preference": ("prompt", "chosen", "rejected", "system"),
    "sharegpt_preference": ("conversations", "chosen", "rejected", "system"),
    "kto": ("prompt", "completion", "label", "system"),
    "sharegpt_kto": ("conversations", "kto_tag", "system"),
}
# Formats whose rows may carry tool schemas and tool turns (a ``tools`` column, or the entry's ``tools:``).
TOOL_FORMATS = ("sharegpt", "messages")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def chat_template_dir():
    """The built-in chat templates: package data, so a wheel install has them too."""
    return resources.files("ftune") / "chat_templates"


def chat_template_names() -> list[str]:
    return sorted(entry.name.removesuffix(".jinja") for entry in chat_template_dir().iterdir() if entry.name.endswith(".jinja"))


def is_inline_template(value: str) -> bool:
    return "{{" in value or "{%" in value


class ToolFunction(Strict):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$", description="Function name the model calls, e.g. get_weather.")
    description: str = Field("", description="What the function does; the chat template shows it to the model.")
    parameters: dict = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="JSON schema of the arguments object: {type: object, properties: {...}, required: [...]}.",
    )

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, value: dict) -> dict:
        if value.get("type", "object") != "object" or not isinstance(value.get("properties", {}), dict):
            raise ValueError("must be a JSON schema of an object: {type: object, properties: {name: {type: ...}}}")
        return value


class ToolSchema(Strict):
    type: Literal["function"] = Field("function", description="Tool kind; only function tools exist in chat templates.")
    function: ToolFunction = Field(description="The function: name, description and parameters schema.")

    @model_validator(mode="before")
    @classmethod
    def _bare_function(cls, value: object) -> object:
        """Accept a bare {name, description, parameters} function as LLaMA-Factory and OpenAI's older API write it."""
        if isinstance(value, dict) and "function" not in value and "type" not in value:
            return {"type": "function", "function": value}
        return value


class DatasetSource(Strict):
    path: str | None = Field(None, description="Local .jsonl, .json, .csv or .parquet file, or a directory of them.")
    hub: str | None = Field(None, description="Hub dataset id (org/name), read with datasets.load_dataset; needs network.")
    config: str | None = Field(None, description="Hub dataset configuration (subset) name.")
    split: str | None = Field(None, description="Hub dataset split, e.g. train or train[:2000]; default train.")
    revision: str | None = Field(None, description="Hub dataset revision (branch, tag or commit).")
    format: Literal[("auto", *FORMAT_FIELDS)] = Field(
        "auto",
        description="Row format: alpaca (instruction/input/output), sharegpt (conversations from/value, with "
        "function_call/observation turns and a tools column), messages (role/content list, with tool_calls and role "
        "tool), text (raw text, every token trained), classification (text/label), preference (chosen/rejected with "
        "a prompt string or messages, or message lists), sharegpt_preference (conversations + chosen/rejected "
        "messages), kto (prompt/completion + boolean label) and sharegpt_kto (conversations + boolean kto_tag); alpaca, "
        "sharegpt and messages rows with a boolean label or kto_tag are KTO rows too (stage: kto); auto detects it from "
        "the columns.",
    )
    tools: list[ToolSchema] | None = Field(
        None,
        description="Tool schemas offered in every conversation of this entry, each {name, description, parameters: "
        "JSON schema} or {type: function, function: {...}}; rows with their own tools column keep theirs; formats "
        "sharegpt and messages only.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="Map a format field to this dataset's column, e.g. {instruction: question, output: answer}."
    )
    weight: float | None = Field(None, gt=0, description="Training mix factor: 2 repeats every row twice, 0.5 keeps a seeded random half.")
    samples: int | None = Field(None, gt=0, description="Take exactly this many training rows (seeded; rows repeat if there are fewer).")

    @field_validator("path")
    @classmethod
    def _exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or not checks_paths(info):
            return value
        resolved = Path(existing_path(value, "dataset file"))
        if resolved.is_dir():
            if not any(p.suffix in DATA_SUFFIXES for p in resolved.iterdir() if p.is_file()):
                raise ValueError(f"directory '{value}' holds no {', '.join(DATA_SUFFIXES)} files")
        elif resolved.suffix not in DATA_SUFFIXES:
            raise ValueError(f"'{value}' is not a .jsonl, .json, .csv or .parquet file, nor a directory of them")
        return str(resolved)

    @field_validator("hub")
    @classmethod
    def _hub_id(cls, value: str | None) -> str | None:
        if value is not None and not HUB_ID.match(value):
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
        if self.tools is not None:
            if self.format not in ("auto", *TOOL_FORMATS):
                raise ValueError(f"tools only apply to formats {', '.join(TOOL_FORMATS)} (tool-calling chats); remove tools or change format")
            names = [tool.function.name for tool in self.tools]
            duplicate = next((name for name in names if names.count(name) > 1), None)
            if duplicate:
                raise ValueError(f"tools: function '{duplicate}' is listed twice; keep one schema per name")
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
        description="Padding-free batches (positions restart per example, same loss): auto = every batch under flash attention "
        "or sdpa (ftune's, example by example, a prompt prefix the batch's examples share computed once), elsewhere per "
        "batch where cheaper; true = every batch; false = dynamic padding.",
    )
    train_on_prompt: bool = Field(False, description="Also train on prompt tokens; default trains on responses only.")
    chat_template: str | None = Field(
        None,
        description="Chat template: a built-in name (chatml, chatml-tools for tool calling, llama3, gemma, phi3, mistral, deepseek, "
        "alpaca; ftune models lists each family's), a .jinja file, or inline Jinja; default = the tokenizer's own.",
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
    def _known_template(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or is_inline_template(value) or value in chat_template_names() or not checks_paths(info):
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
