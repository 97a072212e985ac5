"""Recipe schema of the ``method`` section: one model per fine-tuning method, discriminated on ``name``.

Each method states its capabilities beside its knobs (tasks, quantized bases, merge, gradient
checkpointing, model needs). That set of class variables *is* the capability matrix: the recipe
validator enforces it and ``ftune methods`` prints it, so the two can never disagree.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

CAUSAL_LM = "causal_lm"
CLASSIFICATION = "classification"
ALL_TASKS = frozenset({CAUSAL_LM, CLASSIFICATION})


class Strict(BaseModel):
    """Base of every recipe section: unknown keys are errors and sections are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MethodBase(Strict):
    """Capabilities every method declares; read by the validator and by ``ftune methods``."""

    summary: ClassVar[str] = ""
    tasks: ClassVar[frozenset[str]] = ALL_TASKS
    quantized_base: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    gradient_checkpointing: ClassVar[bool] = True
    needs: ClassVar[str] = ""  # model property the method relies on, checked after the model loads
    unmergeable_hint: ClassVar[str] = "use the adapter run directory directly (ftune eval/generate read it)"


class FullMethod(MethodBase):
    """Every parameter trains."""

    summary: ClassVar[str] = "full fine-tuning: every parameter trains"
    quantized_base: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False
    unmergeable_hint: ClassVar[str] = "full fine-tuning already writes complete weights; export the run directly"

    name: Literal["full"]


LORA_INITS = ("gaussian", "default", "pissa", "olora")


class LoraMethod(MethodBase):
    """Low-rank adapters (LoRA) and its variants: rsLoRA scaling, DoRA, PiSSA/OLoRA initialisation."""

    summary: ClassVar[str] = "low-rank adapters; variants rsLoRA, DoRA, PiSSA/OLoRA init"

    name: Literal["lora"]
    r: int = Field(16, gt=0, le=1024, description="Adapter rank; capacity vs memory, 8-64 typical.")
    alpha: float = Field(32, gt=0, description="Scaling numerator: updates are scaled by alpha/r (alpha/sqrt(r) with rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt (e.g. [q_proj, v_proj]) or 'all-linear' for every linear layer but the output head.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which bias terms also train.")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Extra modules trained in full and saved with the adapter (e.g. lm_head, score)."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r); helps at high rank.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (magnitude + direction).")
    init: Literal["gaussian", "default", "pissa", "olora"] = Field(
        "default", description="Adapter initialisation: default (B=0), gaussian, pissa or olora (SVD/QR of the base weight)."
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one module, or be 'all-linear'")
        return value


METHOD_CLASSES: tuple[type[MethodBase], ...] = (FullMethod, LoraMethod)

MethodConfig = Annotated[Union[FullMethod, LoraMethod], Field(discriminator="name")]


def method_names() -> list[str]:
    return [cls.model_fields["name"].annotation.__args__[0] for cls in METHOD_CLASSES]


def method_class(name: str) -> type[MethodBase]:
    return dict(zip(method_names(), METHOD_CLASSES))[name]
