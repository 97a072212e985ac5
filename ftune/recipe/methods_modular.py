"""Method sections that add modules or inputs instead of changing weights: soft prompts and prefixes,
bottleneck adapters, and their combinations MAM and UniPELT."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ftune.recipe.method_base import PROMPT_HINT, MethodBase, Strict


# Each layer's prefix is its own entry of the key/value cache, so a compiled layer specialises on which layer it is.
PREFIX_COMPILE_BLOCKER = "its prefixes reach each layer through the key/value cache, so every layer would compile on its own"


class PromptLearningBase(MethodBase):
    """Methods that learn virtual tokens instead of changing weights."""

    mergeable: ClassVar[bool] = False
    unmergeable_hint: ClassVar[str] = PROMPT_HINT
    # peft's prompt encoder sits outside the decoder layers FSDP makes units of; under FSDP2 its embedding fails after the
    # first save ("aten.embedding got mixed torch.Tensor and DTensor", measured for each method of this family and MAM).
    fsdp: ClassVar[bool] = False
    plan_rule: ClassVar[str] = "virtual_tokens"
    plan_exact: ClassVar[bool] = True


def virtual_tokens_field():
    return Field(20, gt=0, le=512, description="Learned virtual tokens; they take room in the context.")


def prefix_init_field(default: str = "gated"):
    return Field(
        default,
        description="How the prefixes start. gated: behind one gate per layer and head that starts closed, so a fresh model "
        "computes exactly what the base computes, prefixes from the base's own keys/values for real tokens; tokens: those "
        "keys/values without a gate (a fresh model is the base reading a few extra tokens first); random: peft's random "
        "prefixes. Models whose attention bypasses transformers' attention interface (BLOOM) start as tokens under gated.",
    )


PAST_KV_NEED = "past_key_values"  # decoder LMs and BERT-style encoders take a key/value cache; DistilBERT does not


class PrefixMethod(PromptLearningBase):
    """Prefix tuning: learned key/value prefixes in every attention layer, optionally through an MLP."""

    summary: ClassVar[str] = "prefix tuning: learned key/value prefixes in every layer"
    gradient_checkpointing: ClassVar[bool] = False  # peft refuses: the prefix cache breaks recomputation
    needs: ClassVar[str] = PAST_KV_NEED

    compile_blocker: ClassVar[str] = PREFIX_COMPILE_BLOCKER
    plan_rule: ClassVar[str] = "prefixes"  # the prefixes, the MLP of prefix_projection and the gates of init: gated
    name: Literal["prefix"]
    num_virtual_tokens: int = virtual_tokens_field()
    init: Literal["gated", "tokens", "random"] = prefix_init_field()
    # The measured best (docs/methods.md): through the MLP a 1e-3 run reaches 0.85 held-out exact match where direct
    # prefixes, whose every value moves ~lr a step, reach 0.00 behind closed gates and 0.50 from tokens in 30 steps.
    prefix_projection: bool = Field(True, description="Reparameterise the prefixes through a two-layer MLP (faster learning, "
                                    "more parameters while training; only the prefixes are saved). false: learn them directly.")
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

    plan_exact: ClassVar[bool] = False  # the prompt encoder MLP/LSTM is not sized
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

    compile_blocker: ClassVar[str] = PREFIX_COMPILE_BLOCKER
    plan_rule: ClassVar[str] = "prefixes"
    name: Literal["ptuning_v2"]
    num_virtual_tokens: int = virtual_tokens_field()
    # Direct prefixes behind closed gates learn measurably less in the same steps (docs/methods.md: 0.67 held-out exact
    # match against 0.83 from tokens, each at its best rate), so deep prompts start as the base reading real tokens.
    init: Literal["gated", "tokens", "random"] = prefix_init_field("tokens")


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

    compile_blocker: ClassVar[str] = PREFIX_COMPILE_BLOCKER
    fsdp: ClassVar[bool] = False  # its prefixes are peft's prompt encoder, as with method: prefix
    name: Literal["mam"]
    num_virtual_tokens: int = Field(30, gt=0, le=512, description="Prefix length per layer (the paper's l = 30); takes room in the context.")
    init: Literal["gated", "tokens", "random"] = prefix_init_field()
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
