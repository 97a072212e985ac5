"""Model families: what ftune knows about each architecture, in one table keyed by ``config.model_type``.

The adapter placements, UniPELT's layer layout and the GGUF writer's architecture names are read
from ``FAMILIES``; ``ftune models`` prints it, and tests/unit/test_families.py builds a tiny model
of every decoder row from its config and checks each capability the row claims (and the refusal of
each one it does not).
"""

from __future__ import annotations

from dataclasses import dataclass


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
    moe: bool = False  # mixture of experts: router load-balancing loss kept, all-linear leaves the router alone
    decoder: bool = True  # causal LM (False: encoder, classification only)


_LLAMA_LIKE = dict(attention_output="self_attn.o_proj", feed_forward_output="mlp.down_proj",
                   attention_block="self_attn", feed_forward_block="mlp", unipelt=True)

FAMILIES: dict[str, Family] = {
    "llama": Family("Llama 2/3, DeepSeek-LLM, SmolLM2", **_LLAMA_LIKE, gguf="llama", permute_qk=True),
    "mistral": Family("Mistral", **_LLAMA_LIKE, gguf="llama", permute_qk=True),  # llama.cpp runs Mistral as llama
    "qwen2": Family("Qwen2, Qwen2.5", **_LLAMA_LIKE, gguf="qwen2"),  # NEOX rotary = Hugging Face's rotate-half
    "qwen3": Family("Qwen3", **_LLAMA_LIKE, gguf="qwen3"),
    "smollm3": Family("SmolLM3", **_LLAMA_LIKE),
    "gemma": Family("Gemma", **_LLAMA_LIKE),
    "gemma2": Family("Gemma 2", **_LLAMA_LIKE, gguf="gemma2"),
    # Phi-3's fused GGUF reads back in transformers but llama.cpp 0.3.36 refuses to load it, so it is not exported.
    "phi3": Family("Phi-3", attention_output="self_attn.o_proj", feed_forward_output="mlp.down_proj",
                   attention_block="self_attn", feed_forward_block="mlp"),
    "gpt2": Family("GPT-2", attention_output="attn.c_proj", feed_forward_output="mlp.c_proj",
                   attention_block="attn", feed_forward_block="mlp", gguf="gpt2"),
    # BLOOM's attention and MLP add the residual inside themselves, so no block can be wrapped as a parallel branch.
    "bloom": Family("BLOOM", attention_output="self_attention.dense", feed_forward_output="mlp.dense_4h_to_h", gguf="bloom"),
    "gpt_neox": Family("GPT-NeoX, Pythia", attention_output="attention.dense", feed_forward_output="mlp.dense_4h_to_h",
                       attention_block="attention", feed_forward_block="mlp", prefix=False),
    # Bottleneck adapters need a dense feed-forward block to sit after or beside; a sparse MoE block is not one.
    "mixtral": Family("Mixtral", moe=True),
    "qwen3_moe": Family("Qwen3-MoE", moe=True),
    **{model_type: Family(label, attention_output="attention.output.dense", feed_forward_output="output.dense", decoder=False)
       for model_type, label in (("bert", "BERT"), ("roberta", "RoBERTa"), ("xlm-roberta", "XLM-RoBERTa"))},
    "distilbert": Family("DistilBERT", attention_output="attention.out_lin", feed_forward_output="ffn.lin2", decoder=False),
}


def with_capability(attribute: str) -> tuple[str, ...]:
    """The model types whose row sets ``attribute`` (a truthy field of ``Family``)."""
    return tuple(sorted(model_type for model_type, family in FAMILIES.items() if getattr(family, attribute)))


MATRIX_COLUMNS = ("model_type", "LoRA/QLoRA/full", "adapter", "parallel", "UniPELT", "prefix", "GGUF", "MoE", "family")


def matrix_rows() -> list[tuple[str, ...]]:
    """The decoder rows of ``FAMILIES`` as ``ftune models`` prints them (the README shows the same table)."""
    mark = lambda flag: "yes" if flag else "-"  # noqa: E731
    return [
        (model_type, "yes", mark(f.attention_output and f.feed_forward_output), mark(f.attention_block and f.feed_forward_block),
         mark(f.unipelt), mark(f.prefix), f.gguf or "-", mark(f.moe), f.label)
        for model_type, f in FAMILIES.items() if f.decoder
    ]


def untested_family_note(name_or_path: str) -> str | None:
    """For ``ftune validate``: a note when a local model's ``config.json`` names a model type outside ``FAMILIES``.

    Only local folders are read (hub ids and the built-in model would need a download or an import).
    """
    import json
    from pathlib import Path

    config = Path(name_or_path).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None  # loading the model reports a broken config properly
    if model_type in FAMILIES:
        return None
    return (f"model: model_type {model_type!r} is not in ftune's tested families (ftune models lists them); "
            "it may still train, but nothing here has checked it")
