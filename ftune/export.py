"""Export a Hugging Face model folder to deployable formats, and prove each export is faithful.

Every writer loads back what it wrote and compares logits with the source model on a few token
sequences, so a scrambled export (a missed llama.cpp permutation, a bad quantization, a tokenizer
that splits text differently) shows up in the returned report instead of in production.
``FORMATS`` maps a format name to its writer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ftune.errors import FtuneError

if TYPE_CHECKING:
    import numpy as np

GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0")

# Largest max-abs logit difference accepted after the round trip, as a fraction of the largest
# |reference logit|, because rounding error grows with logit scale (~4 in the unit tests' tiny
# model, ~40 in SmolLM2-135M). Measured on both: f16 <= 1.3e-3, bf16 <= 1e-2, q8_0 <= 3.2e-2, so
# 3-8x headroom; a q/k permutation mistake gives 0.4-0.9.
LOGIT_TOLERANCE = {"safetensors": 1e-6, "f32": 1e-5, "f16": 1e-2, "bf16": 5e-2, "q8_0": 1e-1}

# model_type -> (llama.cpp architecture, whether q/k rows are permuted). llama.cpp runs mistral as
# llama; it runs qwen2 with NEOX rotary, which already matches Hugging Face's rotate-half layout.
_ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
SUPPORTED_GGUF_ARCHITECTURES = tuple(_ARCHITECTURES)

_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}

# Digits, an emoji and code so number splitting and byte fallback are exercised too. No system
# turn: several chat templates reject one.
_SAMPLE_CHAT = [
    {"role": "user", "content": "What is 1234 + 56? Answer in Python: print(1234+56) 🙂"},
    {"role": "assistant", "content": "1290. Über-simple:\n\tprint(1290)"},
]


class UnsupportedExport(FtuneError):
    """The model or the requested options cannot be exported to the requested format."""


@dataclass
class ExportReport:
    """What was written and how closely it reproduces the source; ``tolerance`` is absolute."""

    path: Path
    format: str
    quant: str | None
    size_bytes: int
    max_abs_logit_diff: float
    next_token_agreement: float
    tolerance: float
    passed: bool
    tokenizer_match: bool | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def compare_logits(reference_model: Any, candidate_model: Any, input_ids: Any) -> tuple[float, float]:
    """Max abs logit difference and the share of positions whose argmax token agrees.

    ``input_ids`` is a 2-D tensor or a list of id sequences; sequences run one at a time, so they
    may differ in length and need no padding or attention mask.
    """
    worst, agreement, _ = _logit_stats(reference_model, candidate_model, input_ids)
    return worst, agreement


def _logit_stats(reference_model: Any, candidate_model: Any, input_ids: Any) -> tuple[float, float, float]:
    """``compare_logits`` plus the largest |reference logit|, which scales the tolerance."""
    import torch

    worst, scale, agree, total = 0.0, 0.0, 0, 0
    with torch.inference_mode():
        for ids in input_ids:
            batch = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
            ref = reference_model(input_ids=batch).logits.float()
            cand = candidate_model(input_ids=batch).logits.float()
            worst = max(worst, (ref - cand).abs().max().item())
            scale = max(scale, ref.abs().max().item())
            agree += (ref.argmax(-1) == cand.argmax(-1)).sum().item()
            total += ref.argmax(-1).numel()  # one per position, or one per sequence for a classifier
    return worst, agree / max(total, 1), scale


def export_safetensors(model_dir: Path, out: Path, *, max_shard_size: str = "2GB") -> ExportReport:
    """Re-save ``model_dir`` as sharded safetensors in the folder ``out``, with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FtuneError(f"{out} already exists and is not empty; pick a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    # Built beside the target and renamed into place, so a crash never leaves a half-written model.
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging)
        if (model_dir / "generation_config.json").is_file():
            # Verbatim, because re-serialising drops fields transformers does not know about.
            shutil.copy2(model_dir / "generation_config.json", staging / "generation_config.json")
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    return _verified_report(
        out, "safetensors", None, model, reloaded, tokenizer, AutoTokenizer.from_pretrained(out), []
    )


def export_gguf(model_dir: Path, out: Path, *, quant: str = "f16") -> ExportReport:
    """Write ``model_dir`` as one llama.cpp GGUF file with its tokenizer and chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir, out = Path(model_dir), Path(out)
    if quant not in GGUF_QUANTS:
        raise UnsupportedExport(f"unknown GGUF quant type {quant!r}; supported: {', '.join(GGUF_QUANTS)}")
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type not in _ARCHITECTURES:
        raise UnsupportedExport(
            f"GGUF export does not support model_type {config.model_type!r}; "
            f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UnsupportedExport(f"GGUF export supports only default rotary embeddings, not {rope['rope_type']!r}")

    # float32 source so the f32 export can be checked bit for bit, whatever dtype the folder holds.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        notes = _write_gguf(model, tokenizer, staging, quant, name=model_dir.name)
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)

    # Loaded from a folder holding nothing but the file: transformers prefers a tokenizer.json lying
    # beside it, which would make the tokenizer check compare the source with itself.
    with tempfile.TemporaryDirectory() as isolated:
        (Path(isolated) / out.name).symlink_to(out.resolve())
        reloaded = AutoModelForCausalLM.from_pretrained(isolated, gguf_file=out.name, dtype=torch.float32).eval()
        gguf_tokenizer = AutoTokenizer.from_pretrained(isolated, gguf_file=out.name)
    return _verified_report(out, "gguf", quant, model, reloaded, tokenizer, gguf_tokenizer, notes)


FORMATS: dict[str, Callable[..., ExportReport]] = {"safetensors": export_safetensors, "gguf": export_gguf}


def _verified_report(
    path: Path, fmt: str, quant: str | None, source: Any, exported: Any,
    source_tokenizer: Any, exported_tokenizer: Any, notes: list[str],
) -> ExportReport:
    import torch

    if source_tokenizer.chat_template is None:
        chat_text = "\n".join(message["content"] for message in _SAMPLE_CHAT)
    else:
        chat_text = source_tokenizer.apply_chat_template(_SAMPLE_CHAT, tokenize=False)
    chat_ids = source_tokenizer(chat_text)["input_ids"]
    same_template = exported_tokenizer.chat_template == source_tokenizer.chat_template
    tokenizer_match = same_template and exported_tokenizer(chat_text)["input_ids"] == chat_ids
    if not tokenizer_match:
        notes = [*notes, "tokenizer loaded back from the export encodes the sample chat differently"]

    # Random ids reach rows of the embedding and lm_head that the short chat never touches.
    generator = torch.Generator().manual_seed(0)
    sequences = [chat_ids, *torch.randint(0, source.config.vocab_size, (2, 48), generator=generator)]
    diff, agreement, scale = _logit_stats(source, exported, sequences)
    tolerance = LOGIT_TOLERANCE[quant or fmt] * scale
    size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return ExportReport(
        path=path, format=fmt, quant=quant, size_bytes=size, max_abs_logit_diff=diff,
        next_token_agreement=agreement, tolerance=tolerance,
        passed=diff <= tolerance and tokenizer_match, tokenizer_match=tokenizer_match, notes=notes,
    )


def _write_gguf(model: Any, tokenizer: Any, path: Path, quant: str, *, name: str) -> list[str]:
    """Write the GGUF file at ``path``; returns notes on tensors stored other than as asked."""
    import gguf

    config = model.config
    arch_name, permute_qk = _ARCHITECTURES[config.model_type]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}

    writer = gguf.GGUFWriter(path, arch_name)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES[quant]])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    _add_tokenizer(writer, tokenizer, config.vocab_size)
    if quant == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    qtype = gguf.GGMLQuantizationType[quant.upper()]
    fallbacks: list[str] = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        mapped = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise UnsupportedExport(f"no GGUF tensor name for {hf_name!r} in architecture {arch_name!r}")
        kind, gguf_name = mapped
        data = tensor.detach().float().numpy()
        if permute_qk and kind in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
            data = _permute_for_rope(data, heads if kind == gguf.MODEL_TENSOR.ATTN_Q else kv_heads)
        data, stored = _encode(data, qtype)
        if tensor.dim() > 1 and stored != qtype:
            fallbacks.append(gguf_name)
        writer.add_tensor(gguf_name, data, raw_dtype=stored)

    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    with open(path, "rb") as written:
        os.fsync(written.fileno())
    if not fallbacks:
        return []
    return [f"q8_0 needs rows divisible by 32; stored as f16 instead: {', '.join(fallbacks)}"]


def _permute_for_rope(weights: "np.ndarray", n_head: int) -> "np.ndarray":
    """Reorder q/k rows from Hugging Face's rotate-half layout to llama.cpp's interleaved pairs.

    Same as llama.cpp's ``LlamaModel.permute``; transformers' GGUF loader applies the inverse.
    """
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _encode(data: "np.ndarray", qtype: Any) -> tuple["np.ndarray", Any]:
    """Quantize one tensor; norms and other 1-D tensors stay f32 as llama.cpp expects."""
    import gguf

    types = gguf.GGMLQuantizationType
    if data.ndim == 1:
        return data, types.F32
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block_size:
        qtype = types.F16
    return gguf.quants.quantize(data, qtype), qtype


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """Byte-level BPE vocabulary, merges, special ids and chat template, under llama.cpp's keys."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise UnsupportedExport("GGUF export supports byte-level BPE tokenizers only (like GPT-2, Llama 3, Qwen2)")

    tokens = {index: token for token, index in model["vocab"].items()}
    types = dict.fromkeys(tokens, gguf.TokenType.NORMAL)
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    if max(tokens) >= vocab_size:
        raise UnsupportedExport(f"tokenizer has ids up to {max(tokens)} but the model's vocab_size is {vocab_size}")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    # llama.cpp needs one token per embedding row; rows the tokenizer never emits get placeholders.
    writer.add_token_list([tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)])
    writer.add_token_types([types.get(i, gguf.TokenType.UNUSED) for i in range(vocab_size)])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])

    for key in ("bos", "eos", "pad", "unk"):
        if (token_id := getattr(tokenizer, f"{key}_token_id")) is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    with_special, plain = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    writer.add_add_bos_token(with_special[:1] != plain[:1] and with_special[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(with_special[-1:] != plain[-1:] and with_special[-1] == tokenizer.eos_token_id)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """The ``tokenizer.ggml.pre`` name that makes llama.cpp split text the way this tokenizer does.

    Unrecognised shapes get "default"; the tokenizer round trip check then reports any mismatch.
    """
    parts: Sequence[dict] = (pre_tokenizer or {}).get("pretokenizers") or ([pre_tokenizer] if pre_tokenizer else [])
    shape = [(p["type"], p.get("individual_digits"), p.get("use_regex")) for p in parts]
    if shape == [("ByteLevel", None, True)]:
        return "gpt-2"
    if shape == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"
    if len(parts) == 2 and shape[0][0] == "Split" and shape[1] == ("ByteLevel", None, False):
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        regex = parts[0].get("pattern", {}).get("Regex")
        return next((name for name, known in GGUF_PRE_TOKENIZER_SPLITS.items() if known == regex), "default")
    return "default"
