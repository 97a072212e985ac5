"""Recipe schema of the ``method`` section: one model per fine-tuning method, discriminated on ``name``.

Each method states its capabilities beside its knobs (tasks, quantized bases, merge, gradient
checkpointing, model needs). That set of class variables *is* the capability matrix: the recipe
validator enforces it and ``ftune methods`` prints it, so the two can never disagree. Rules that
depend on a method's own settings (DoRA on 8 bits, PiSSA on any quantized base) live in the
method's ``recipe_problems``; rules that need the loaded model are checked when the method is applied.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from ftune.recipe.tasks import ALL_TASKS

BOTH_BITS = (4, 8)
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
    needs: ClassVar[str] = ""  # model property the method relies on (short), checked after the model loads
    unmergeable_hint: ClassVar[str] = "use the adapter run directory directly (ftune eval/generate read it)"

    def recipe_problems(self, recipe: Any) -> list[str]:
        """Conflicts between this method's settings and the rest of the recipe, each a one-line fix."""
        return []


def _non_empty_targets(value: list[str] | str) -> list[str] | str:
    if isinstance(value, list) and not value:
        raise ValueError("must name at least one module, or be 'all-linear'")
    return value


TargetModules = Annotated[list[str] | Literal["all-linear"], AfterValidator(_non_empty_targets)]
TARGETS_HELP = "Module names to adapt (e.g. [q_proj, v_proj]) or 'all-linear' for every linear layer but the output head."


class FullMethod(MethodBase):
    """Every parameter trains."""

    summary: ClassVar[str] = "full fine-tuning: every parameter trains"
    quantized_base: ClassVar[tuple[int, ...]] = ()
    mergeable: ClassVar[bool] = False
    unmergeable_hint: ClassVar[str] = COMPLETE_WEIGHTS_HINT

    name: Literal["full"]


class FreezeMethod(MethodBase):
    """The top transformer layers train (plus named extra modules); everything below stays frozen."""

    summary: ClassVar[str] = "only the top N transformer layers (or listed layers) train, plus extra modules"
    quantized_base: ClassVar[tuple[int, ...]] = ()
    mergeable: ClassVar[bool] = False
    needs: ClassVar[str] = "numbered layers"
    unmergeable_hint: ClassVar[str] = COMPLETE_WEIGHTS_HINT

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

    name: Literal["bitfit"]


# SVD/QR initialisations that move part of the base weight into the adapter; saved converted back to
# a plain LoRA on the original base.
CONVERTED_INITS = ("pissa", "olora")


class LoraMethod(MethodBase):
    """Low-rank adapters (LoRA) and its variants: rsLoRA scaling, DoRA, PiSSA/OLoRA initialisation."""

    summary: ClassVar[str] = "low-rank adapters; variants rsLoRA, DoRA, PiSSA/OLoRA init"

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

    name: Literal["vera"]
    r: int = Field(256, gt=0, le=8192, description="Rank of the shared random projections (cheap: they are not trained).")
    d_initial: float = Field(0.1, gt=0, description="Initial value of the trained scaling vector d.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    projection_prng_key: int = Field(0, description="Seed of the shared random projections.")
    save_projection: bool = Field(True, description="Store the projections in the adapter file (safe across torch versions).")
    target_modules: TargetModules = Field("all-linear", description=TARGETS_HELP)


class PromptLearningBase(MethodBase):
    """Methods that learn virtual tokens instead of changing weights."""

    mergeable: ClassVar[bool] = False
    unmergeable_hint: ClassVar[str] = PROMPT_HINT


def virtual_tokens_field():
    return Field(20, gt=0, le=512, description="Learned virtual tokens; they take room in the context.")


PAST_KV_NEED = "past_key_values"  # decoder LMs and BERT-style encoders take a key/value cache; DistilBERT does not


class PrefixMethod(PromptLearningBase):
    """Prefix tuning: learned key/value prefixes in every attention layer, optionally through an MLP."""

    summary: ClassVar[str] = "prefix tuning: learned key/value prefixes in every layer"
    gradient_checkpointing: ClassVar[bool] = False  # peft refuses: the prefix cache breaks recomputation
    needs: ClassVar[str] = PAST_KV_NEED

    name: Literal["prefix"]
    num_virtual_tokens: int = virtual_tokens_field()
    prefix_projection: bool = Field(False, description="Reparameterise the prefixes through a two-layer MLP (more stable, more parameters).")
    encoder_hidden_size: int = Field(512, gt=0, description="Hidden width of that MLP; only with prefix_projection: true.")

    @model_validator(mode="after")
    def _width_needs_projection(self) -> PrefixMethod:
        if not self.prefix_projection and self.encoder_hidden_size != 512:
            raise ValueError("encoder_hidden_size only applies with prefix_projection: true; set it or remove encoder_hidden_size")
        return self


class PromptMethod(PromptLearningBase):
    """Prompt tuning: learned input embeddings prepended to every example."""

    summary: ClassVar[str] = "prompt tuning: learned soft-prompt embeddings"

    name: Literal["prompt"]
    num_virtual_tokens: int = virtual_tokens_field()
    init: Literal["random", "text"] = Field("random", description="Start from random embeddings or from the embeddings of init_text.")
    init_text: str | None = Field(None, description="Text whose tokens initialise the virtual tokens (init: text), e.g. a task instruction.")

    @model_validator(mode="after")
    def _text_with_text_init(self) -> PromptMethod:
        if self.init == "text" and not self.init_text:
            raise ValueError("init: text needs init_text (e.g. 'Classify the sentiment of this review:')")
        if self.init != "text" and self.init_text is not None:
            raise ValueError("init_text only applies with init: text; set init: text or remove init_text")
        return self


class PtuningMethod(PromptLearningBase):
    """P-tuning: virtual token embeddings produced by a small trained encoder (MLP or LSTM)."""

    summary: ClassVar[str] = "P-tuning: virtual tokens from an MLP/LSTM prompt encoder"

    name: Literal["ptuning"]
    num_virtual_tokens: int = virtual_tokens_field()
    encoder: Literal["mlp", "lstm"] = Field("mlp", description="Prompt encoder architecture.")
    encoder_hidden_size: int = Field(128, gt=0, description="Hidden width of the prompt encoder.")
    encoder_num_layers: int = Field(2, gt=0, le=8, description="LSTM layers (the MLP always has two).")
    encoder_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout inside the prompt encoder.")

    @model_validator(mode="after")
    def _layers_need_lstm(self) -> PtuningMethod:
        if self.encoder == "mlp" and self.encoder_num_layers != 2:
            raise ValueError("encoder_num_layers only applies with encoder: lstm (the MLP has two layers)")
        return self


class PtuningV2Method(PromptLearningBase):
    """P-tuning v2: deep prompts (key/value prefixes at every layer) trained directly, no reparameterisation."""

    summary: ClassVar[str] = "P-tuning v2: deep prompts at every layer, no reparameterisation"
    gradient_checkpointing: ClassVar[bool] = False
    needs: ClassVar[str] = PAST_KV_NEED

    name: Literal["ptuning_v2"]
    num_virtual_tokens: int = virtual_tokens_field()


class AdapterMethod(MethodBase):
    """Bottleneck adapters after (Houlsby) or beside (parallel, He et al.) the attention and/or feed-forward block of every layer."""

    summary: ClassVar[str] = "bottleneck adapters (down, non-linearity, up): sequential (Houlsby) or parallel"
    mergeable: ClassVar[bool] = False
    needs: ClassVar[str] = "known layer layout"  # llama, mistral, qwen2/3, gemma, phi3, bert, roberta, distilbert, gpt2
    unmergeable_hint: ClassVar[str] = "the adapter's non-linearity cannot be folded into weights; use the run directory directly, or pick lora"

    name: Literal["adapter"]
    reduction_factor: int = Field(16, gt=0, description="Hidden size / bottleneck width; 16 = ~1/8 of a layer's parameters per adapter pair.")
    placement: Literal["both", "attention", "feed_forward"] = Field("both", description="Sublayers that get an adapter (after them; beside them with style: parallel).")
    non_linearity: Literal["relu", "gelu", "silu"] = Field("gelu", description="Activation inside the bottleneck.")
    style: Literal["sequential", "parallel"] = Field(
        "sequential",
        description="sequential: the bottleneck rewrites the sublayer's output (Houlsby); parallel: it reads the sublayer's "
        "input and its scaled output is added to the sublayer's (He et al. 2022; decoder LMs: llama family, gpt2).",
    )
    scaling: float = Field(1.0, gt=0, description="Factor on the parallel adapter's output (He et al. use 4 on the feed-forward block); parallel only.")

    @model_validator(mode="after")
    def _scaling_needs_parallel(self) -> AdapterMethod:
        if self.style == "sequential" and self.scaling != 1.0:
            raise ValueError("scaling only applies with style: parallel; set style: parallel or remove scaling")
        return self


ADAPTERS_HINT = (
    "learned prefixes are attention inputs and a bottleneck's non-linearity cannot be folded into weights; "
    "use the run directory directly (ftune eval/generate read it), or pick lora"
)
LLAMA_FAMILY_NEED = "llama-family layers"  # q/v/o projections in self_attn, an mlp block; checked on load


class MamMethod(MethodBase):
    """Mix-and-match adapter (He et al. 2022): prefix tuning on attention plus a scaled parallel adapter beside every feed-forward block."""

    summary: ClassVar[str] = "MAM adapter: prefix tuning on attention + scaled parallel feed-forward adapter"
    mergeable: ClassVar[bool] = False
    unmergeable_hint: ClassVar[str] = ADAPTERS_HINT
    gradient_checkpointing: ClassVar[bool] = False  # peft's prefixes live in the key/value cache, as with method: prefix
    needs: ClassVar[str] = "past_key_values, mlp"  # llama family or gpt2: the parallel adapter wraps their mlp block

    name: Literal["mam"]
    num_virtual_tokens: int = Field(30, gt=0, le=512, description="Prefix length per layer (the paper's l = 30); takes room in the context.")
    prefix_projection: bool = Field(False, description="Reparameterise the prefixes through a two-layer MLP (peft's prefix projection).")
    encoder_hidden_size: int = Field(512, gt=0, description="Hidden width of that MLP; only with prefix_projection: true.")
    bottleneck: int = Field(64, gt=0, description="Width of the parallel feed-forward adapter (the paper uses 512 on 1024-wide models).")
    scaling: float = Field(4.0, gt=0, description="Factor on the parallel adapter's output (4 in the paper).")
    non_linearity: Literal["relu", "gelu", "silu"] = Field("relu", description="Activation inside the bottleneck (ReLU in the paper).")

    @model_validator(mode="after")
    def _width_needs_projection(self) -> MamMethod:
        if not self.prefix_projection and self.encoder_hidden_size != 512:
            raise ValueError("encoder_hidden_size only applies with prefix_projection: true; set it or remove encoder_hidden_size")
        return self


class UnipeltLora(Strict):
    """UniPELT's LoRA part: low-rank updates of the query and value projections."""

    r: int = Field(8, gt=0, le=1024, description="Rank of the query/value updates.")
    alpha: float = Field(16, gt=0, description="Scaling numerator: updates are scaled by alpha/r.")


class UnipeltPrefix(Strict):
    """UniPELT's prefix part: learned keys and values every attention head also attends over."""

    num_virtual_tokens: int = Field(10, gt=0, le=512, description="Learned key/value pairs per layer (not tokens of the context).")


class UnipeltAdapter(Strict):
    """UniPELT's adapter part: a sequential bottleneck after the feed-forward block."""

    bottleneck: int = Field(48, gt=0, description="Bottleneck width.")
    non_linearity: Literal["relu", "gelu", "silu"] = Field("relu", description="Activation inside the bottleneck.")


class UnipeltMethod(MethodBase):
    """UniPELT (Mao et al. 2022): gated LoRA on q/v, a gated prefix on attention and a gated adapter after the feed-forward block."""

    summary: ClassVar[str] = "UniPELT: LoRA + prefix + adapter per layer, each behind a learned gate"
    mergeable: ClassVar[bool] = False
    unmergeable_hint: ClassVar[str] = ADAPTERS_HINT
    needs: ClassVar[str] = LLAMA_FAMILY_NEED

    name: Literal["unipelt"]
    lora: UnipeltLora = Field(default_factory=UnipeltLora, description="LoRA on the query and value projections.")
    prefix: UnipeltPrefix = Field(default_factory=UnipeltPrefix, description="Learned attention prefix.")
    adapter: UnipeltAdapter = Field(default_factory=UnipeltAdapter, description="Bottleneck adapter after the feed-forward block.")
    gates: bool = Field(True, description="Multiply each part by its gate sigmoid(W_g h); false = plain sum of the parts (ablation).")


METHOD_CLASSES: tuple[type[MethodBase], ...] = (
    FullMethod, FreezeMethod, BitfitMethod, LoraMethod, AdaloraMethod, Ia3Method, LohaMethod, LokrMethod,
    OftMethod, BoftMethod, VeraMethod, PrefixMethod, PromptMethod, PtuningMethod, PtuningV2Method, AdapterMethod,
    MamMethod, UnipeltMethod,
)

MethodConfig = Annotated[Union[METHOD_CLASSES], Field(discriminator="name")]


def method_names() -> list[str]:
    return [cls.model_fields["name"].annotation.__args__[0] for cls in METHOD_CLASSES]


def method_class(name: str) -> type[MethodBase]:
    return dict(zip(method_names(), METHOD_CLASSES))[name]
