"""Model families: what ftune knows about each architecture, in one table keyed by ``config.model_type``.

The adapter placements, UniPELT's layer layout, the GGUF writer's architecture names and quirks, the
classification head names and each family's chat layout are read from ``FAMILIES``; ``ftune models``
prints it, and tests/unit/test_families.py builds a tiny model of every decoder row from its config,
with a tokenizer carrying the family's chat template, and checks each capability the row claims (and
the refusal of each one it does not). The shipped templates render as llama.cpp's built-in
implementations of the same layouts do (tests/unit/test_chat_templates.py).

Facts that cover model types without a row (liger-kernel's list, the encoders ``ftune plan`` lays
out) are the frozensets below the table. This is the only module that names a model type; a test
(tests/unit/test_families.py) fails on a model type spelled anywhere else in ftune/.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatLayout:
    """A chat template shipped in ftune/chat_templates: what closes an assistant turn, and the tokens it needs."""

    end_of_turn: str | None  # the marker after each assistant reply; None: the tokenizer's EOS
    markers: tuple[str, ...] = ()  # layout tokens that must be single vocabulary entries for generation to stop
    llama_cpp: str = ""  # llama.cpp's built-in template of the same layout (the reference the tests compare with)
    # Every turn is before + role + after + content + end, and a reply starts with reply_start (in that order; the
    # Ollama Modelfile's Go template is built from it). None: the layout is not of that shape.
    turn: tuple[str, str, str, str] | None = None


# Gemma renames the assistant role and Mistral and DeepSeek have no per-role markers: no turn of the shared shape.
CHAT_LAYOUTS: dict[str, ChatLayout] = {
    "chatml": ChatLayout("<|im_end|>", ("<|im_start|>", "<|im_end|>"), "chatml",
                         ("<|im_start|>", "\n", "<|im_end|>\n", "<|im_start|>assistant\n")),
    "llama3": ChatLayout("<|eot_id|>", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "llama3",
                         ("<|start_header_id|>", "<|end_header_id|>\n\n", "<|eot_id|>",
                          "<|start_header_id|>assistant<|end_header_id|>\n\n")),
    "gemma": ChatLayout("<end_of_turn>", ("<start_of_turn>", "<end_of_turn>"), "gemma"),
    "phi3": ChatLayout("<|end|>", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "phi3",
                       ("<|", "|>\n", "<|end|>\n", "<|assistant|>\n")),
    "mistral": ChatLayout(None, (), "mistral-v3"),
    "deepseek": ChatLayout(None, (), "deepseek2"),  # DeepSeek-LLM chat and DeepSeek-V2 share it
}


@dataclass(frozen=True)
class Family:
    label: str  # how ftune models names it, with models of the family
    attention_output: str | None = None  # module whose output a sequential adapter transforms, relative to a layer
    feed_forward_output: str | None = None
    attention_block: str | None = None  # blocks a parallel adapter sits beside (input: the hidden state they read)
    feed_forward_block: str | None = None
    unipelt: bool = False  # self_attn.{q,v,o}_proj and an mlp block that takes and returns the hidden state
    prefix: bool = True  # peft's prefix tuning / P-tuning v2 / MAM prefixes reach attention (checked on a batch at apply)
    gguf: str | None = None  # llama.cpp architecture ftune's GGUF writer emits
    permute_qk: bool = False  # q/k rows reordered to llama.cpp's interleaved rotary layout
    # Config values the GGUF file cannot carry and its readers assume: (attribute, value), where a string value names
    # the attribute it must equal. Other values are refused before export.
    gguf_assumes: tuple[tuple[str, float | str], ...] = ()
    unit_offset_norm: bool = False  # RMSNorm multiplies by 1 + weight; llama.cpp's files store the factor itself
    qkv_bias: bool = False  # q/k/v projections have biases though config.json has no attention_bias key
    moe: bool = False  # mixture of experts: router load-balancing loss kept, all-linear leaves the router alone
    decoder: bool = True  # causal LM (False: encoder, classification only)
    chat_template: str | None = None  # the family's instruct layout in ftune/chat_templates; None: its models have none
    linear_targets: tuple[str, ...] = ()  # what target_modules: all-linear adapts in each layer (experts: fused weights)
    classification_head: tuple[str, ...] = ("score",)  # modules the sequence-classification model adds on top of the base


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_LLAMA_LIKE = dict(attention_output="self_attn.o_proj", feed_forward_output="mlp.down_proj",
                   attention_block="self_attn", feed_forward_block="mlp", unipelt=True,
                   linear_targets=(*_ATTENTION, "gate_proj", "up_proj", "down_proj"))
_NEOX_STYLE = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
# The router is left out: adapting it moves which experts every token reaches (name it to adapt it).
_MOE = dict(moe=True, linear_targets=(*_ATTENTION, "experts"))

FAMILIES: dict[str, Family] = {
    "llama": Family("Llama 2/3, DeepSeek-LLM, SmolLM2", **_LLAMA_LIKE, gguf="llama", permute_qk=True, chat_template="llama3"),
    # llama.cpp runs Mistral as llama
    "mistral": Family("Mistral", **_LLAMA_LIKE, gguf="llama", permute_qk=True, chat_template="mistral"),
    # NEOX rotary = rotate-half
    "qwen2": Family("Qwen2, Qwen2.5", **_LLAMA_LIKE, gguf="qwen2", chat_template="chatml", qkv_bias=True),
    # transformers' GGUF loader, which verifies every file, has no key for head_dim and assumes Qwen3's 128 (every
    # released Qwen3 has it).
    "qwen3": Family("Qwen3", **_LLAMA_LIKE, gguf="qwen3", chat_template="chatml", gguf_assumes=(("head_dim", 128),)),
    "smollm3": Family("SmolLM3", **_LLAMA_LIKE, chat_template="chatml"),
    "gemma": Family("Gemma", **_LLAMA_LIKE, chat_template="gemma", unit_offset_norm=True),
    # llama.cpp scales queries by 1/sqrt(head_dim); transformers' GGUF loader assumes Gemma 2's usual soft-capping.
    # Gemma-2-2B and 9B have exactly these values, 27B does not.
    "gemma2": Family("Gemma 2", **_LLAMA_LIKE, gguf="gemma2", chat_template="gemma", unit_offset_norm=True,
                     gguf_assumes=(("query_pre_attn_scalar", "head_dim"), ("attn_logit_softcapping", 50.0),
                                   ("final_logit_softcapping", 30.0))),
    # Phi-3's fused GGUF reads back in transformers but llama.cpp 0.3.36 refuses to load it, so it is not exported.
    "phi3": Family("Phi-3", attention_output="self_attn.o_proj", feed_forward_output="mlp.down_proj",
                   attention_block="self_attn", feed_forward_block="mlp", chat_template="phi3",
                   linear_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    # GPT-2, BLOOM and GPT-NeoX/Pythia are base models without a chat layout: recipes name one (data.chat_template).
    "gpt2": Family("GPT-2", attention_output="attn.c_proj", feed_forward_output="mlp.c_proj",
                   attention_block="attn", feed_forward_block="mlp", gguf="gpt2", linear_targets=("c_attn", "c_proj", "c_fc")),
    # BLOOM's attention and MLP add the residual inside themselves, so no block can be wrapped as a parallel branch.
    "bloom": Family("BLOOM", attention_output="self_attention.dense", feed_forward_output="mlp.dense_4h_to_h", gguf="bloom",
                    linear_targets=_NEOX_STYLE),
    "gpt_neox": Family("GPT-NeoX, Pythia", attention_output="attention.dense", feed_forward_output="mlp.dense_4h_to_h",
                       attention_block="attention", feed_forward_block="mlp", prefix=False, linear_targets=_NEOX_STYLE),
    # Bottleneck adapters need a dense feed-forward block to sit after or beside; a sparse MoE block is not one.
    "mixtral": Family("Mixtral", **_MOE, chat_template="mistral"),
    "qwen3_moe": Family("Qwen3-MoE", **_MOE, chat_template="chatml"),
    **{model_type: Family(label, attention_output="attention.output.dense", feed_forward_output="output.dense", decoder=False,
                          classification_head=("classifier",))
       for model_type, label in (("bert", "BERT"), ("roberta", "RoBERTa"), ("xlm-roberta", "XLM-RoBERTa"))},
    "distilbert": Family("DistilBERT", attention_output="attention.out_lin", feed_forward_output="ffn.lin2", decoder=False,
                         classification_head=("pre_classifier", "classifier")),
}

# The encoders ftune plan sizes, by layer layout. BERT's: attention.self.{query,key,value}, attention.output.dense,
# intermediate.dense, output.dense, token types and a hidden x hidden dense under the classifier. ELECTRA has no row
# (nothing else is checked on it) but BERT's layers. DistilBERT's: attention.{q,k,v,out}_lin, ffn.lin{1,2}, no token
# types, its sizes under other config.json names.
BERT_LAYOUT = frozenset({"bert", "roberta", "xlm-roberta", "electra"})
DISTILBERT_LAYOUT = frozenset({"distilbert"})

# The text families liger-kernel 0.8 patches (its MODEL_TYPE_TO_APPLY_LIGER_FN, vision towers left out).
LIGER_MODEL_TYPES = frozenset({
    "deepseek_v2", "deepseek_v3", "exaone4", "falcon_h1", "gemma", "gemma2", "gemma3", "gemma3_text", "glm4", "gpt_oss",
    "granite", "hunyuan_v1_dense", "hunyuan_v1_moe", "llama", "llama4", "llama4_text", "ministral", "mistral", "mixtral",
    "nemotron", "olmo2", "olmo3", "phi3", "qwen2", "qwen3", "qwen3_moe", "qwen3_next", "smollm3",
})

# Every model type this module names: tests/unit/test_families.py refuses any of them spelled elsewhere in ftune/.
MODEL_TYPES = frozenset({*FAMILIES, *BERT_LAYOUT, *DISTILBERT_LAYOUT, *LIGER_MODEL_TYPES})


def with_capability(attribute: str) -> tuple[str, ...]:
    """The model types whose row sets ``attribute`` (a truthy field of ``Family``)."""
    return tuple(sorted(model_type for model_type, family in FAMILIES.items() if getattr(family, attribute)))


MATRIX_COLUMNS = ("model_type", "LoRA/QLoRA/full", "adapter", "parallel", "UniPELT", "prefix", "GGUF", "MoE", "chat template",
                  "end of turn", "all-linear adapts", "family")


def matrix_rows() -> list[tuple[str, ...]]:
    """The decoder rows of ``FAMILIES`` as ``ftune models`` prints them (the README shows the same table)."""
    mark = lambda flag: "yes" if flag else "-"  # noqa: E731
    return [
        (model_type, "yes", mark(f.attention_output and f.feed_forward_output), mark(f.attention_block and f.feed_forward_block),
         mark(f.unipelt), mark(f.prefix), f.gguf or "-", mark(f.moe), f.chat_template or "-", end_of_turn_label(f.chat_template),
         ",".join(f.linear_targets), f.label)
        for model_type, f in FAMILIES.items() if f.decoder
    ]


def end_of_turn_label(template: str | None) -> str:
    if template is None:
        return "-"
    return CHAT_LAYOUTS[template].end_of_turn or "EOS"


def local_model_type(name_or_path: str) -> str | None:
    """``model_type`` from a local model folder's ``config.json``; None for hub ids, the built-in model, or no config."""
    import json
    from pathlib import Path

    config = Path(name_or_path).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None  # loading the model reports a broken config properly


def untested_family_note(name_or_path: str) -> str | None:
    """For ``ftune validate``: a note when a local model's ``config.json`` names a model type outside ``FAMILIES``.

    Only local folders are read (hub ids and the built-in model would need a download or an import).
    """
    model_type = local_model_type(name_or_path)
    if model_type is None or model_type in FAMILIES:
        return None
    return (f"model: model_type {model_type!r} is not in ftune's tested families (ftune models lists them); "
            "it may still train, but nothing here has checked it")
