"""The export writers: each writes one deployable format and loads back what it wrote to compare logits with the source
(``ftune.export`` picks the complete weights and the writer)."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftune.errors import FtuneError
from ftune.gguf import DEFAULT_QUANT, as_stored, check_gguf_support, write_gguf
from ftune.gguf_tokenizer import special_tokens_added
from ftune.ollama import LAYOUTS, detect_chat_format, modelfile_path, modelfile_text
from ftune.parity import compare_logits
from ftune.run_dir import atomic_dir, atomic_file, verification_report, write_json_atomic

# Largest max-abs logit difference accepted after the round trip, as a fraction of the largest
# |reference logit|, because rounding error grows with logit scale (~4 in the unit tests' tiny
# model, ~40 in SmolLM2-135M). Measured on both by scripts/bench_gguf_quants.py: f16 <= 1.0e-3,
# bf16 <= 8.4e-3, q8_0 <= 3.2e-2 (3-8x headroom below); q5_1/q5_0 <= 0.45, q4_1/q4_0 <= 0.50
# (~1.6x headroom: zeroed or overflowing blocks push the figure to ~1). At 4-5 bits the
# quantization error alone is as large as a q/k permutation mistake (0.4-0.9), so GGUF files are
# also held to WRITER_TOLERANCE against the source rounded exactly as the file stores it
# (measured 0.0 for every type), which no quantization error can reach.
LOGIT_TOLERANCE = {"safetensors": 1e-6, "f32": 1e-5, "f16": 1e-2, "bf16": 5e-2, "q8_0": 1e-1,
                   "q5_1": 0.7, "q5_0": 0.7, "q4_1": 0.8, "q4_0": 0.8}
WRITER_TOLERANCE = 1e-5

# Digits, an emoji and code so number splitting and byte fallback are exercised too. No system
# turn: several chat templates reject one.
_SAMPLE_CHAT = [
    {"role": "user", "content": "What is 1234 + 56? Answer in Python: print(1234+56) 🙂"},
    {"role": "assistant", "content": "1290. Über-simple:\n\tprint(1290)"},
]


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
    # GGUF: the file against the source rounded exactly as the file stores it (gguf.as_stored), so only a
    # writer or loader mistake (names, q/k order, metadata) moves it, never the quantization error itself.
    writer_max_abs_logit_diff: float | None = None
    writer_tolerance: float | None = None
    modelfile: str | None = None  # GGUF: the Ollama Modelfile written beside it
    chat_layout: str | None = None  # the turn layout its TEMPLATE reproduces (ftune.ollama.LAYOUTS), None if none matched
    llama_cpp: dict | None = None  # --verify llama.cpp: ftune.llamacpp.LlamaCppReport
    base_gguf: str | None = None  # gguf-lora: the base file the adapter applies to (its own report beside it)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def export_safetensors(model_dir: Path, out: Path, *, max_shard_size: str = "2GB") -> ExportReport:
    """Re-save ``model_dir`` as sharded safetensors in the folder ``out``, with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FtuneError(f"{out} already exists and is not empty; pick a new folder")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with atomic_dir(out) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging)
        if (model_dir / "generation_config.json").is_file():
            # Verbatim, because re-serialising drops fields transformers does not know about.
            shutil.copy2(model_dir / "generation_config.json", staging / "generation_config.json")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    return _verified_report(out, "safetensors", None, model, reloaded, tokenizer, AutoTokenizer.from_pretrained(out), [])


def export_gguf(model_dir: Path, out: Path, *, quant: str = DEFAULT_QUANT, system_prompt: str | None = None) -> ExportReport:
    """Write ``model_dir`` as one llama.cpp GGUF file with its tokenizer and chat template, and an Ollama Modelfile
    beside it (``system_prompt``: the recipe's, else the template's own default)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir, out = Path(model_dir), Path(out)
    check_gguf_support(AutoConfig.from_pretrained(model_dir), quant)
    # float32 source so the f32 export can be checked bit for bit, whatever dtype the folder holds.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return write_verified_gguf(model, AutoTokenizer.from_pretrained(model_dir), out, quant=quant, system_prompt=system_prompt,
                               name=model_dir.name)


def write_verified_gguf(model, tokenizer, out: Path, *, quant: str, system_prompt: str | None, name: str,
                        adapter: Path | None = None) -> ExportReport:
    """The GGUF file of a float32 ``model``, checked by loading it back, and its Modelfile (with ``adapter``'s line)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_file(out) as staging:
        notes = write_gguf(model, tokenizer, staging, quant, name=name)
    # Loaded from a folder holding nothing but the file: transformers prefers a tokenizer.json lying
    # beside it, which would make the tokenizer check compare the source with itself.
    with tempfile.TemporaryDirectory() as isolated:
        (Path(isolated) / out.name).symlink_to(out.resolve())
        reloaded = AutoModelForCausalLM.from_pretrained(isolated, gguf_file=out.name, dtype=torch.float32).eval()
        gguf_tokenizer = AutoTokenizer.from_pretrained(isolated, gguf_file=out.name)
    report = _verified_report(out, "gguf", quant, model, reloaded, tokenizer, gguf_tokenizer, notes,
                              as_stored=as_stored(copy.deepcopy(model), quant))
    write_modelfile(report, tokenizer, modelfile_path(adapter or out), system_prompt=system_prompt, adapter=adapter)
    return report


def write_modelfile(report: ExportReport, tokenizer, path: Path, *, system_prompt: str | None, adapter: Path | None = None) -> None:
    chat = detect_chat_format(tokenizer, runtime_adds_bos=special_tokens_added(tokenizer)[0])
    if chat is None:
        report.notes.append(f"Modelfile has no TEMPLATE: the chat template matches none of {', '.join(LAYOUTS)}; "
                            "Ollama falls back to the GGUF's chat template metadata")
    with atomic_file(path) as staging:
        staging.write_text(modelfile_text(report.path.name, chat, system_prompt=system_prompt,
                                          adapter=adapter.name if adapter else None), encoding="utf-8")
    report.modelfile, report.chat_layout = str(path), chat.layout if chat else None


def export_gguf_lora(model_dir: Path, out: Path, *, quant: str = DEFAULT_QUANT, system_prompt: str | None = None,
                     adapter_dir: Path, load_base) -> ExportReport:
    """Write the run's LoRA adapter as a llama.cpp adapter file at ``out`` and the base it applies to as a GGUF file beside
    it (``quant``; with its own report), with one Modelfile holding both lines. Verified by adding the updates read
    back from the file to the base weights and comparing logits with the merged model in ``model_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftune.gguf_lora import adapter_deltas, adapter_quant, add_deltas, base_gguf_path, write_lora_gguf

    model_dir, out = Path(model_dir), Path(out)
    base = load_base().eval()
    check_gguf_support(base.config, quant)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # the run's own: its chat template and special tokens
    base_out = base_gguf_path(out, quant)
    base_report = write_verified_gguf(base, tokenizer, base_out, quant=quant, system_prompt=system_prompt,
                                      name=f"{model_dir.parent.name}-base", adapter=out)
    write_json_atomic(verification_report(base_out), base_report.to_dict())
    stored = adapter_quant(quant)
    with atomic_file(out) as staging:
        written = write_lora_gguf(adapter_dir, base.config, staging, stored, name=model_dir.parent.name)
    merged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rebuilt = add_deltas(base, adapter_deltas(out, base))
    notes = [f"{written['modules']} adapted weights, rank {'/'.join(map(str, written['ranks']))}, stored {stored}; "
             f"base {base_out.name} ({quant}) beside it"]
    # The merged folder may hold 16-bit weights: its rounding then bounds the agreement, not the adapter file's.
    saved = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    saved = {"bfloat16": "bf16", "float16": "f16"}.get(saved.get("dtype") or saved.get("torch_dtype"), stored)
    report = _verified_report(out, "gguf-lora", stored, merged, rebuilt, tokenizer, tokenizer, notes,
                              tolerance_key=max(stored, saved, key=LOGIT_TOLERANCE.get))
    report.modelfile, report.chat_layout, report.base_gguf = base_report.modelfile, base_report.chat_layout, str(base_out)
    report.passed = report.passed and base_report.passed
    return report


def _verified_report(
    path: Path, fmt: str, quant: str | None, source: Any, exported: Any,
    source_tokenizer: Any, exported_tokenizer: Any, notes: list[str], as_stored: Any = None, tolerance_key: str | None = None,
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
    parity = compare_logits(source, exported, sequences)
    diff, agreement = parity.max_abs_diff, parity.agreement
    tolerance = LOGIT_TOLERANCE[tolerance_key or quant or fmt] * parity.scale
    passed = diff <= tolerance and tokenizer_match
    writer_diff = writer_tolerance = None
    if as_stored is not None:
        writer_diff, writer_tolerance = compare_logits(as_stored, exported, sequences).max_abs_diff, WRITER_TOLERANCE * parity.scale
        passed = passed and writer_diff <= writer_tolerance
    size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return ExportReport(
        path=path, format=fmt, quant=quant, size_bytes=size, max_abs_logit_diff=diff,
        next_token_agreement=agreement, tolerance=tolerance, passed=passed, tokenizer_match=tokenizer_match,
        writer_max_abs_logit_diff=writer_diff, writer_tolerance=writer_tolerance, notes=notes,
    )


