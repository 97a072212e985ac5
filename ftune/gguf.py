"""GGUF writer: a Hugging Face causal LM folder -> one llama.cpp GGUF file with tokenizer and chat template.

Written with the ``gguf`` package's own writer and tensor-name map, so names and metadata keys are
llama.cpp's; q/k rows are permuted to llama.cpp's rotary layout where the architecture needs it.
``ftune.export`` verifies every file this writes by loading it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftune.families import FAMILIES
from ftune.gguf_tokenizer import UnsupportedExport, add_tokenizer

if TYPE_CHECKING:
    import numpy as np

# Every type the gguf package can quantize to in Python. Its k-quants (q4_k, q5_k, q6_k) only dequantize;
# llama.cpp's own llama-quantize makes them from the f16 file.
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
K_QUANTS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
DEFAULT_QUANT = "f16"

# model_type -> (llama.cpp architecture, whether q/k rows are permuted), from ftune.families.
_ARCHITECTURES = {model_type: (family.gguf, family.permute_qk) for model_type, family in FAMILIES.items() if family.gguf}
SUPPORTED_GGUF_ARCHITECTURES = tuple(_ARCHITECTURES)

_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", **{q: f"MOSTLY_{q.upper()}" for q in GGUF_QUANTS[3:]}}


def check_quant(quant: str) -> None:
    if quant in K_QUANTS:
        raise UnsupportedExport(
            f"--quant {quant!r}: k-quants cannot be written from Python (the gguf package only reads them); export "
            f"--quant f16 and run llama.cpp's `llama-quantize model-f16.gguf model-{quant}.gguf {quant.upper()}`, "
            f"or pick one of {', '.join(GGUF_QUANTS)}"
        )
    if quant not in GGUF_QUANTS:
        raise UnsupportedExport(f"--quant {quant!r}: expected one of {', '.join(GGUF_QUANTS)}")


def check_gguf_support(config: Any, quant: str) -> None:
    """Refuse, before any weights load, what the writer cannot express."""
    check_quant(quant)
    if config.model_type not in _ARCHITECTURES:
        raise UnsupportedExport(
            f"GGUF export does not support model_type {config.model_type!r}; "
            f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    family = FAMILIES[config.model_type]
    expected = {key: getattr(config, value, None) if isinstance(value, str) else value for key, value in family.gguf_assumes}
    differing = {key: getattr(config, key, None) for key, value in expected.items() if getattr(config, key, None) != value}
    if differing:
        needs = ", ".join(f"{key} = {value} ({expected[key]})" if isinstance(value, str) else f"{key} {value}"
                          for key, value in family.gguf_assumes)
        raise UnsupportedExport(f"GGUF export of {family.label} needs {needs} (llama.cpp or transformers' GGUF loader assumes "
                                f"it); this model has {differing}")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UnsupportedExport(f"GGUF export supports only default rotary embeddings, not {rope['rope_type']!r}")


def write_gguf(model: Any, tokenizer: Any, path: Path, quant: str, *, name: str) -> list[str]:
    """Write the GGUF file at ``path``; returns notes on tensors stored other than as asked."""
    import gguf

    config = model.config
    family = FAMILIES[config.model_type]
    arch_name, arch = gguf_architecture(config)

    writer = gguf.GGUFWriter(path, arch_name)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES[quant]])
    _hyperparameter_writer(arch)(writer, config)
    writer.add_vocab_size(config.vocab_size)
    add_tokenizer(writer, tokenizer, config.vocab_size)
    if quant.startswith("q"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    qtype = gguf.GGMLQuantizationType[quant.upper()]
    fallbacks: list[str] = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        kind, gguf_name = gguf_name_of(name_map, hf_name, arch_name)
        data = tensor.detach().float().numpy()
        if (reorder := row_reordering(config, kind)) is not None:
            data = reorder(data)
        if stored_transposed(model, hf_name):
            data = data.T.copy()
        if family.unit_offset_norm and hf_name.endswith("norm.weight"):
            data = data + 1
        data, stored = encode_tensor(data, qtype)
        if tensor.dim() > 1 and stored != qtype:
            fallbacks.append(gguf_name)
        writer.add_tensor(gguf_name, data, raw_dtype=stored)

    write_out(writer)
    if not fallbacks:
        return []
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return [f"{quant} needs rows divisible by {block}; stored as f16 instead: {', '.join(fallbacks)}"]


def write_out(writer: Any) -> None:
    """Write a filled ``GGUFWriter``'s header, metadata and tensors, and close it whatever happens."""
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def gguf_architecture(config: Any) -> tuple[str, Any]:
    """llama.cpp's architecture name for ``config`` and the gguf package's enum member for it."""
    import gguf

    arch_name = _ARCHITECTURES[config.model_type][0]
    return arch_name, next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)


def gguf_name_of(name_map: Any, hf_name: str, arch_name: str) -> tuple[Any, str]:
    """(tensor kind, llama.cpp tensor name) of a Hugging Face parameter name."""
    mapped = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
    if mapped is None and "." in hf_name:  # gguf's table lists some BLOOM names without the "transformer." prefix
        mapped = name_map.get_type_and_name(hf_name.split(".", 1)[1], try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise UnsupportedExport(f"no GGUF tensor name for {hf_name!r} in architecture {arch_name!r}")
    return mapped


def row_reordering(config: Any, kind: Any):
    """The reordering of a weight's rows llama.cpp expects for tensors of ``kind`` (None: rows as they are). It is a
    pure permutation of rows, so a LoRA update B @ A is stored by reordering the rows of B alone."""
    import gguf

    arch_name, arch = gguf_architecture(config)
    heads = config.num_attention_heads
    if _ARCHITECTURES[config.model_type][1] and kind in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
        n_head = heads if kind == gguf.MODEL_TENSOR.ATTN_Q else getattr(config, "num_key_value_heads", None) or heads
        return lambda data: _permute_for_rope(data, n_head)
    if arch == gguf.MODEL_ARCH.BLOOM and kind == gguf.MODEL_TENSOR.ATTN_QKV:
        return lambda data: _split_bloom_qkv(data, heads)
    return None


def _add_rotary_hyperparameters(writer: Any, config: Any) -> None:
    """Llama-style decoders (llama, mistral, qwen2, qwen3): RMS norms and rotary positions."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def _add_bloom_hyperparameters(writer: Any, config: Any) -> None:
    """BLOOM: LayerNorm with bias, ALiBi instead of rotary positions, a 4x feed-forward (as llama.cpp's converter)."""
    writer.add_context_length(getattr(config, "seq_length", None) or config.hidden_size)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(4 * config.hidden_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)


def _add_gemma2_hyperparameters(writer: Any, config: Any) -> None:
    """Gemma 2: rotary hyperparameters plus its own head size, logit soft-capping and sliding window."""
    _add_rotary_hyperparameters(writer, config)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_sliding_window(config.sliding_window)


def _split_bloom_qkv(weights: "np.ndarray", n_head: int) -> "np.ndarray":
    """BLOOM interleaves q, k and v per head; llama.cpp wants all q rows, then k, then v (its converter's reshape,
    which transformers' GGUF loader undoes)."""
    per_head = weights.reshape(n_head, 3, weights.shape[0] // n_head // 3, *weights.shape[1:])
    return per_head.swapaxes(0, 1).reshape(weights.shape)


def _add_gpt2_hyperparameters(writer: Any, config: Any) -> None:
    """GPT-2: learned positions, LayerNorm with bias, a 4x feed-forward unless n_inner says otherwise."""
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)


def _hyperparameter_writer(arch: Any):
    """The writer of llama.cpp architecture ``arch``'s hyperparameters (keyed by the gguf package's own names)."""
    import gguf

    writers = {gguf.MODEL_ARCH.BLOOM: _add_bloom_hyperparameters, gguf.MODEL_ARCH.GEMMA2: _add_gemma2_hyperparameters,
               gguf.MODEL_ARCH.GPT2: _add_gpt2_hyperparameters}
    return writers.get(arch, _add_rotary_hyperparameters)


def _permute_for_rope(weights: "np.ndarray", n_head: int) -> "np.ndarray":
    """Reorder q/k rows from Hugging Face's rotate-half layout to llama.cpp's interleaved pairs.

    Same as llama.cpp's ``LlamaModel.permute``; transformers' GGUF loader applies the inverse.
    """
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def as_stored(model: Any, quant: str) -> Any:
    """``model`` with every weight rounded exactly as a ``quant`` GGUF file stores it (in place).

    A file written correctly loads back as this model, to float rounding, whatever the quantization
    error is; ``ftune.export`` compares against it so a writer mistake cannot hide inside 4-bit noise.
    """
    import gguf
    import torch

    qtype = gguf.GGMLQuantizationType[quant.upper()]
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            transposed = stored_transposed(model, name)
            data = parameter.detach().float().numpy()
            encoded, stored = encode_tensor(data.T.copy() if transposed else data, qtype)
            loaded = gguf.quants.dequantize(encoded, stored).reshape(data.T.shape if transposed else data.shape)
            parameter.copy_(torch.from_numpy((loaded.T if transposed else loaded).astype("float32", copy=False)))
    return model


def stored_transposed(model: Any, name: str) -> bool:
    """Whether the file holds this weight transposed: GPT-2's Conv1D layers keep (in, out), llama.cpp wants (out, in)."""
    from transformers.pytorch_utils import Conv1D

    owner, _, leaf = name.rpartition(".")
    return leaf == "weight" and isinstance(model.get_submodule(owner), Conv1D)


def encode_tensor(data: "np.ndarray", qtype: Any) -> tuple["np.ndarray", Any]:
    """Quantize one tensor; norms and other 1-D tensors stay f32 as llama.cpp expects."""
    import gguf

    types = gguf.GGMLQuantizationType
    if data.ndim == 1:
        return data, types.F32
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block_size:
        qtype = types.F16
    return gguf.quants.quantize(data, qtype), qtype

