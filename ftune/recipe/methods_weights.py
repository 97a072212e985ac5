"""Method sections that change weights: full, freeze, BitFit, and the reparameterisations (LoRA and its
variants, AdaLoRA, (IA)^3, LoHa/LoKr, OFT/BOFT, VeRA)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ftune.recipe.method_base import ADAPTER_OFF, BASE_COPY, COMPLETE_WEIGHTS_HINT, TARGETS_HELP, MethodBase, TargetModules


class FullMethod(MethodBase):
    """Every parameter trains."""

    summary: ClassVar[str] = "full fine-tuning: every parameter trains"
    quantized_base: ClassVar[tuple[int, ...]] = ()
    mergeable: ClassVar[bool] = False
    unmergeable_hint: ClassVar[str] = COMPLETE_WEIGHTS_HINT

    reference: ClassVar[str | None] = BASE_COPY
    trains_base_weights: ClassVar[bool] = True
    plan_rule: ClassVar[str] = "all"
    plan_exact: ClassVar[bool] = True
    name: Literal["full"]


class FreezeMethod(MethodBase):
    """The top transformer layers train (plus named extra modules); everything below stays frozen."""

    summary: ClassVar[str] = "only the top N transformer layers (or listed layers) train, plus extra modules"
    quantized_base: ClassVar[tuple[int, ...]] = ()
    mergeable: ClassVar[bool] = False
    needs: ClassVar[str] = "numbered layers"
    unmergeable_hint: ClassVar[str] = COMPLETE_WEIGHTS_HINT

    reference: ClassVar[str | None] = BASE_COPY
    trains_base_weights: ClassVar[bool] = True
    plan_rule: ClassVar[str] = "top_layers"
    plan_exact: ClassVar[bool] = True  # but for extra_modules, which the config names without sizes
    name: Literal["freeze"]
    trainable_layers: int | list[int] = Field(
        2, description="N = the top N layers train; a list = these layer indices train (0 = bottom, -1 = top)."
    )
    extra_modules: list[str] = Field(
        default_factory=list, description="Other modules trained in full, e.g. [norm, lm_head]; a classification head always trains."
    )

    @field_validator("trainable_layers")
    @classmethod
    def _layers(cls, value: int | list[int]) -> int | list[int]:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"must be a positive layer count or a list of layer indices, got {value}")
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError("must list at least one layer index, each once")
        return value


class BitfitMethod(MethodBase):
    """BitFit: only bias terms train (and a classification head)."""

    summary: ClassVar[str] = "BitFit: only bias terms train"
    quantized_base: ClassVar[tuple[int, ...]] = ()
    mergeable: ClassVar[bool] = False
    needs: ClassVar[str] = "bias terms"  # BERT, GPT-2, Qwen2 have them; Llama has none
    unmergeable_hint: ClassVar[str] = COMPLETE_WEIGHTS_HINT

    reference: ClassVar[str | None] = BASE_COPY
    trains_base_weights: ClassVar[bool] = True
    plan_rule: ClassVar[str] = "biases"
    plan_exact: ClassVar[bool] = True
    name: Literal["bitfit"]


# SVD/QR initialisations that move part of the base weight into the adapter; saved converted back to
# a plain LoRA on the original base.
CONVERTED_INITS = ("pissa", "olora")


class LoraMethod(MethodBase):
    """Low-rank adapters (LoRA) and its variants: rsLoRA scaling, DoRA, PiSSA/OLoRA initialisation."""

    summary: ClassVar[str] = "low-rank adapters; variants rsLoRA, DoRA, PiSSA/OLoRA init"

    reference: ClassVar[str | None] = ADAPTER_OFF
    plan_exact: ClassVar[bool] = True
    name: Literal["lora"]
    r: int = Field(16, gt=0, le=1024, description="Adapter rank; capacity vs memory, 8-64 typical.")
    alpha: float = Field(32, gt=0, description="Scaling numerator: updates are scaled by alpha/r (alpha/sqrt(r) with rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: TargetModules = Field("all-linear", description=TARGETS_HELP)
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which bias terms also train.")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Extra modules trained in full and saved with the adapter (e.g. lm_head, score)."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r); helps at high rank.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (magnitude + direction).")
    init: Literal["gaussian", "default", "pissa", "olora"] = Field(
        "default",
        description="Adapter initialisation: default (B=0), gaussian, pissa or olora (SVD/QR of the base weight; "
        "saved as a plain LoRA that applies to the original base).",
    )

    @model_validator(mode="after")
    def _variants_combine(self) -> LoraMethod:
        if self.use_dora and self.init in CONVERTED_INITS:
            raise ValueError(f"use_dora cannot combine with init: {self.init} (its adapter cannot be converted back to the original base); pick one")
        return self

    def recipe_problems(self, recipe: Any) -> list[str]:
        bits = recipe.quantization.bits
        problems = []
        if bits and self.init in CONVERTED_INITS:
            # PiSSA refuses quantized weights; OLoRA re-quantizes the residual base, so its adapter
            # would no longer reproduce the trained model on the original quantized base.
            problems.append(
                f"method.init: {self.init} rewrites the base weights and cannot start from a {bits}-bit base; "
                "remove the quantization section or use init: default"
            )
        if bits == 8 and self.use_dora:
            problems.append(
                "method.use_dora: DoRA fails after the first step on an 8-bit base (bitsandbytes 8-bit state is lost); "
                "use quantization.bits: 4 or set use_dora: false"
            )
        return problems


class AdaloraMethod(MethodBase):
    """AdaLoRA: LoRA whose per-layer ranks are pruned during training from init_r down to a target_r budget."""

    summary: ClassVar[str] = "LoRA with adaptive rank allocation (ranks shrink from init_r toward target_r)"

    reference: ClassVar[str | None] = ADAPTER_OFF
    plan_exact: ClassVar[bool] = True
    name: Literal["adalora"]
    init_r: int = Field(12, gt=0, le=1024, description="Starting rank of every adapted layer.")
    target_r: int = Field(8, gt=0, description="Average rank per layer once the budget is allocated.")
    alpha: float = Field(32, gt=0, description="Scaling numerator, as LoRA's alpha.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: TargetModules = Field("all-linear", description=TARGETS_HELP)
    tinit: int = Field(0, ge=0, description="Warm-up steps before ranks start to shrink.")
    tfinal: int = Field(0, ge=0, description="Final steps with the allocation frozen (fine-tuning the kept ranks).")
    deltaT: int = Field(1, gt=0, description="Reallocate ranks every deltaT steps.")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the importance scores.")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of the importance uncertainty.")
    orth_reg_weight: float = Field(0.5, ge=0, description="Weight of the orthogonality penalty on the adapter factors.")

    @model_validator(mode="after")
    def _budget_below_start(self) -> AdaloraMethod:
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r}): ranks only shrink")
        return self

    def recipe_problems(self, recipe: Any) -> list[str]:
        steps = recipe.training.max_steps
        if steps is not None and self.tinit + self.tfinal >= steps:
            return [
                f"method.tinit + method.tfinal ({self.tinit} + {self.tfinal}) leave no step of rank allocation in "
                f"training.max_steps: {steps}; lower them or raise max_steps"
            ]
        return []


class Ia3Method(MethodBase):
    """(IA)^3: learned vectors rescale attention keys/values and feed-forward activations."""

    summary: ClassVar[str] = "(IA)^3: learned rescaling vectors on keys, values and feed-forward"

    reference: ClassVar[str | None] = ADAPTER_OFF
    plan_rule: ClassVar[str] = "scaling_vectors"
    name: Literal["ia3"]
    target_modules: TargetModules | None = Field(
        None, description="Modules whose outputs (or inputs, for feed-forward ones) are rescaled; null = peft's default for the architecture."
    )
    feedforward_modules: list[str] | None = Field(
        None,
        description="Which target_modules are feed-forward layers (scaled on the input side); a subset of target_modules. "
        "null = none of an explicit list, peft's default with target_modules: null.",
    )

    @model_validator(mode="after")
    def _feedforward_subset(self) -> Ia3Method:
        if self.feedforward_modules is not None:
            if not isinstance(self.target_modules, list):
                raise ValueError("feedforward_modules needs an explicit target_modules list that contains them")
            extra = [m for m in self.feedforward_modules if m not in self.target_modules]
            if extra:
                raise ValueError(f"feedforward_modules {extra} are not in target_modules; add them there too")
        return self


class DecomposedUpdateMethod(MethodBase):
    """Knobs shared by peft's LyCORIS-style methods (LoHa, LoKr): a factorised weight update with dropout."""

    quantized_base: ClassVar[tuple[int, ...]] = (8,)

    alpha: float = Field(8, gt=0, description="Scaling numerator (alpha/r).")
    rank_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on rank components during training.")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="Probability of skipping a whole adapted module in a step.")
    target_modules: TargetModules = Field("all-linear", description=TARGETS_HELP)


class LohaMethod(DecomposedUpdateMethod):
    """LoHa: the weight update is a Hadamard product of two low-rank products."""

    summary: ClassVar[str] = "LoHa: Hadamard product of two low-rank updates"
    quantized_note: ClassVar[str] = "peft's LoHa reads the packed 4-bit weight shape and fails; 8-bit works"

    plan_rule: ClassVar[str] = "low_rank_pair"  # two low-rank factor pairs per update
    plan_exact: ClassVar[bool] = True
    reference: ClassVar[str | None] = ADAPTER_OFF
    name: Literal["loha"]
    r: int = Field(8, gt=0, le=1024, description="Rank of each of the two factors.")


class LokrMethod(DecomposedUpdateMethod):
    """LoKr: the weight update is a Kronecker product of a small and a low-rank matrix."""

    summary: ClassVar[str] = "LoKr: Kronecker-product update"
    quantized_note: ClassVar[str] = "peft's LoKr reads the packed 4-bit weight shape and fails; 8-bit works"

    name: Literal["lokr"]
    r: int = Field(8, gt=0, le=1024, description="Rank of the low-rank Kronecker factor.")
    decompose_both: bool = Field(False, description="Also factor the small Kronecker matrix into low rank.")
    decompose_factor: int = Field(-1, description="Size of the small Kronecker factor; -1 = as square as the shape allows.")


class OftMethod(MethodBase):
    """OFT: an orthogonal block-diagonal rotation of each adapted weight's input space."""

    summary: ClassVar[str] = "OFT: orthogonal (block-diagonal) rotation of weights"

    reference: ClassVar[str | None] = ADAPTER_OFF
    name: Literal["oft"]
    block_size: int = Field(32, gt=0, description="Size of each orthogonal block; must divide every adapted layer's input width.")
    coft: bool = Field(False, description="Constrained OFT: keep the rotation within eps of the identity.")
    eps: float = Field(6e-5, gt=0, description="Constraint radius of coft.")
    block_share: bool = Field(False, description="One rotation block shared by all blocks of a layer.")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="Probability of dropping a rotation block in a step.")
    target_modules: TargetModules = Field("all-linear", description=TARGETS_HELP)


class BoftMethod(MethodBase):
    """BOFT: orthogonal updates built from butterfly-factorised sparse rotations."""

    summary: ClassVar[str] = "BOFT: butterfly-factorised orthogonal update"

    reference: ClassVar[str | None] = ADAPTER_OFF
    name: Literal["boft"]
    block_size: int = Field(4, ge=0, description="Size of each butterfly block (set block_size or block_num, the other 0).")
    block_num: int = Field(0, ge=0, description="Number of blocks per layer (alternative to block_size).")
    n_butterfly_factor: int = Field(1, gt=0, description="Butterfly factors; 1 = plain block-diagonal OFT. Above 1 needs peft's CUDA extension; without it (CPU) peft uses 1.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Multiplicative dropout on the butterfly blocks.")
    target_modules: TargetModules = Field("all-linear", description=TARGETS_HELP)

    @model_validator(mode="after")
    def _size_or_count(self) -> BoftMethod:
        if (self.block_size == 0) == (self.block_num == 0):
            raise ValueError("set exactly one of block_size and block_num (the other 0)")
        return self


class VeraMethod(MethodBase):
    """VeRA: frozen random low-rank matrices shared by all layers, scaled by small trained vectors."""

    summary: ClassVar[str] = "VeRA: shared frozen random projections, trained scaling vectors"

    reference: ClassVar[str | None] = ADAPTER_OFF
    plan_rule: ClassVar[str] = "vera"
    plan_exact: ClassVar[bool] = True
    name: Literal["vera"]
    r: int = Field(256, gt=0, le=8192, description="Rank of the shared random projections (cheap: they are not trained).")
    d_initial: float = Field(0.1, gt=0, description="Initial value of the trained scaling vector d.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    projection_prng_key: int = Field(0, description="Seed of the shared random projections.")
    save_projection: bool = Field(True, description="Store the projections in the adapter file (safe across torch versions).")
    target_modules: TargetModules = Field("all-linear", description=TARGETS_HELP)
