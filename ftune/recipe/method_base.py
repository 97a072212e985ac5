"""What every method section shares: strict sections, the capability class variables, target-module lists."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict

from ftune.recipe.tasks import ALL_TASKS

BOTH_BITS = (4, 8)
# How stage: dpo recovers a method's reference model (``MethodBase.reference``).
ADAPTER_OFF = "adapter_off"  # the base with the adapter switched off: no second copy of the weights
BASE_COPY = "base_copy"  # the method changes base weights: a frozen copy of the base, or precomputed log-probs
COMPLETE_WEIGHTS_HINT = "the run already writes complete weights; export RUN/model directly (ftune export)"
PROMPT_HINT = "virtual tokens are inputs, not weights; use the run directory directly (ftune eval/generate read it), or pick lora"


class Strict(BaseModel):
    """Base of every recipe section: unknown keys are errors and sections are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MethodBase(Strict):
    """Capabilities every method declares; read by the validator and by ``ftune methods``."""

    summary: ClassVar[str] = ""
    tasks: ClassVar[frozenset[str]] = ALL_TASKS
    quantized_base: ClassVar[tuple[int, ...]] = BOTH_BITS  # bit widths (bitsandbytes) the method trains on; () = none
    quantized_note: ClassVar[str] = "quantized weights have no gradients"  # why a bit width is missing
    mergeable: ClassVar[bool] = True
    gradient_checkpointing: ClassVar[bool] = True
    # Why training.compile cannot serve the method ("" = it can): all decoder layers must share one compiled graph.
    compile_blocker: ClassVar[str] = ""
    needs: ClassVar[str] = ""  # model property the method relies on (short), checked after the model loads
    unmergeable_hint: ClassVar[str] = "use the adapter run directory directly (ftune eval/generate read it)"
    # DPO's reference model: ADAPTER_OFF, BASE_COPY, or None where switching the method off does not recover the base.
    reference: ClassVar[str | None] = None
    trains_base_weights: ClassVar[bool] = False  # the trained tensors are base weights (no separate adapter tensors)
    # Whether FSDP2 can shard a model this method wrapped (peft's prompt encoders sit outside the layers it shards).
    fsdp: ClassVar[bool] = True
    # How ``ftune plan`` sizes the trained tensors (a rule of ftune.training.plan.TRAINABLE_SHAPES) and whether that
    # rule is exact for this method.
    plan_rule: ClassVar[str] = "low_rank"
    plan_exact: ClassVar[bool] = False

    def recipe_problems(self, recipe: Any) -> list[str]:
        """Conflicts between this method's settings and the rest of the recipe, each a one-line fix."""
        return []


def _non_empty_targets(value: list[str] | str) -> list[str] | str:
    if isinstance(value, list) and not value:
        raise ValueError("must name at least one module, or be 'all-linear'")
    return value


TargetModules = Annotated[list[str] | Literal["all-linear"], AfterValidator(_non_empty_targets)]
TARGETS_HELP = "Module names to adapt (e.g. [q_proj, v_proj]) or 'all-linear' for every linear layer but the output head."
