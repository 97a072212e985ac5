"""Export stage: write a run's complete weights in a deployable format, and prove each export is faithful.

``run_export`` finds the run's complete weights (merging first when the run holds an adapter: the
one place a stage calls another) and hands them to a writer of ``FORMATS``. Every writer loads
back what it wrote and compares logits with the source model on a few token sequences, so a
scrambled export (a missed llama.cpp permutation, a bad quantization, a tokenizer that splits text
differently) shows up in the report instead of in production.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ftune.disk import explained, mib, report_file_size_limit, written_bytes
from ftune.errors import FtuneError
from ftune.gguf import DEFAULT_QUANT, UnsupportedExport, as_stored, check_gguf_support, check_quant, special_tokens_added, write_gguf
from ftune.ollama import LAYOUTS, detect_chat_format, modelfile_path, modelfile_text
from ftune.parity import compare_logits
from ftune.recipe.tasks import CLASSIFICATION
from ftune.run_dir import RunDir, atomic_dir, atomic_file, load_run, run_lock, verification_report, write_json_atomic

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
    import copy

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir, out = Path(model_dir), Path(out)
    check_gguf_support(AutoConfig.from_pretrained(model_dir), quant)
    # float32 source so the f32 export can be checked bit for bit, whatever dtype the folder holds.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with atomic_file(out) as staging:
        notes = write_gguf(model, tokenizer, staging, quant, name=model_dir.name)

    # Loaded from a folder holding nothing but the file: transformers prefers a tokenizer.json lying
    # beside it, which would make the tokenizer check compare the source with itself.
    with tempfile.TemporaryDirectory() as isolated:
        (Path(isolated) / out.name).symlink_to(out.resolve())
        reloaded = AutoModelForCausalLM.from_pretrained(isolated, gguf_file=out.name, dtype=torch.float32).eval()
        gguf_tokenizer = AutoTokenizer.from_pretrained(isolated, gguf_file=out.name)
    chat = detect_chat_format(tokenizer, runtime_adds_bos=special_tokens_added(tokenizer)[0])
    if chat is None:
        notes = [*notes, f"Modelfile has no TEMPLATE: the chat template matches none of {', '.join(LAYOUTS)}; "
                         "Ollama falls back to the GGUF's chat template metadata"]
    with atomic_file(modelfile_path(out)) as staging:
        staging.write_text(modelfile_text(out.name, chat, system_prompt=system_prompt), encoding="utf-8")
    report = _verified_report(out, "gguf", quant, model, reloaded, tokenizer, gguf_tokenizer, notes,
                              as_stored=as_stored(copy.deepcopy(model), quant))
    report.modelfile, report.chat_layout = str(modelfile_path(out)), chat.layout if chat else None
    return report


@dataclass(frozen=True)
class ExportFormat:
    write: Callable[..., ExportReport]  # (complete model folder, output path, **options) -> report
    default_name: Callable[[dict], str]  # output name under RUN/export/, from the options
    options: Callable[[str | None, Any], dict]  # (--quant, recipe) -> the writer's options, refusing what does not apply


def _gguf_options(quant: str | None, recipe) -> dict:
    if quant is not None:
        check_quant(quant)
    return {"quant": quant or DEFAULT_QUANT, "system_prompt": recipe.data.system_prompt}


def _no_quant(quant: str | None, recipe) -> dict:
    if quant is not None:
        raise FtuneError("--quant applies to --format gguf only; safetensors keeps the merged weights' dtype")
    return {}


FORMATS: dict[str, ExportFormat] = {
    "safetensors": ExportFormat(export_safetensors, lambda options: "safetensors", _no_quant),
    "gguf": ExportFormat(export_gguf, lambda options: f"model-{options['quant']}.gguf", _gguf_options),
}


def _verified_report(
    path: Path, fmt: str, quant: str | None, source: Any, exported: Any,
    source_tokenizer: Any, exported_tokenizer: Any, notes: list[str], as_stored: Any = None,
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
    tolerance = LOGIT_TOLERANCE[quant or fmt] * parity.scale
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


class MergeParityError(Exception):
    """The merge export needs does not reproduce the adapter model (a failed check, not a user mistake: exit 1)."""

    def __init__(self, report) -> None:
        super().__init__(f"merged model differs from the adapter model by {report.max_abs_logit_diff:.3g} > {report.tolerance:.3g}")
        self.report = report


def complete_weights(run: RunDir, recipe, *, echo=print) -> Path:
    """The folder with the run's complete weights: ``RUN/model`` when training wrote full weights,
    ``RUN/merged`` for an adapter run (merged first when missing)."""
    from ftune.merge import check_mergeable, describe, run_merge

    if run.has_complete_weights():
        return run.model
    if run.is_merged():
        return run.merged
    check_mergeable(recipe)
    echo(f"No merged model in {run.root} yet; merging first.")
    report = run_merge(run.root, echo=echo)
    echo(describe(report))
    if not report.passed:
        raise MergeParityError(report)
    return run.merged


VERIFIERS = ("llama.cpp",)  # runtimes ``--verify`` can run an export in, beside the transformers reload every export gets


def run_export(run_dir, fmt: str, *, quant: str | None = None, out: str | Path | None = None, verify: str | None = None,
               prompts: int = 16, echo=print) -> ExportReport:
    """Export the run's complete weights with ``FORMATS[fmt]``; the verification report is written beside the output.

    ``verify="llama.cpp"`` also runs a GGUF in llama.cpp on ``prompts`` of the run's held-out prompts."""
    from ftune.runtime import quiet_libraries

    if fmt not in FORMATS:
        raise FtuneError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if verify is not None and verify not in VERIFIERS:
        raise FtuneError(f"--verify {verify!r}: expected one of {', '.join(VERIFIERS)}")
    if verify is not None and fmt != "gguf":
        raise FtuneError(f"--verify {verify} runs GGUF files; add --format gguf")
    export_format = FORMATS[fmt]
    run, recipe = load_run(run_dir)
    report_file_size_limit()
    options = export_format.options(quant, recipe)
    if recipe.task == CLASSIFICATION:
        raise UnsupportedExport(
            f"{run.root}: ftune export writes causal language models; a classification run's merged folder "
            "(ftune merge) is already a plain safetensors model for AutoModelForSequenceClassification"
        )
    quiet_libraries()
    with run_lock(run.root, echo=echo):
        source = complete_weights(run, recipe, echo=echo)
        target = Path(out).expanduser().resolve() if out else run.export_dir / export_format.default_name(options)
        echo(f"Exporting {source} as {fmt}{' ' + options['quant'] if 'quant' in options else ''} to {target}...")
        started = time.time()
        with explained(target, needs=f"the export needs up to {mib(written_bytes(source))} (the source weights' size)",
                       cleanup=lambda: remove_export(target, since=started)):
            report = export_format.write(source, target, **options)
            if verify == "llama.cpp":
                check_in_llama_cpp(report, run, recipe, source, prompts, echo=echo)
            write_json_atomic(verification_report(target), report.to_dict())
    return report


def remove_export(target: Path, *, since: float) -> None:
    """After a failed write, remove what this export had already put in place (the weights without their Modelfile
    or report), so no half set of files passes for an export; an earlier export's files are left alone."""
    for path in (target, modelfile_path(target) if target.suffix == ".gguf" else None, verification_report(target)):
        if path is None or not path.exists() or path.stat().st_mtime < since:
            continue
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()


def check_in_llama_cpp(report: ExportReport, run: RunDir, recipe, source: Path, prompts: int, *, echo=print) -> None:
    from ftune.data.heldout import conversations, load_heldout
    from ftune.generation import prompt_and_reference
    from ftune.llamacpp import INSTALL_HINT, llama_cpp_available, verify_with_llama_cpp

    if not llama_cpp_available():
        report.notes.append(f"llama.cpp check skipped: llama-cpp-python is not installed; {INSTALL_HINT}")
        return
    chats = [prompt_and_reference(c)[0] for c in conversations(load_heldout(run, recipe))][:prompts]
    if not chats:
        report.notes.append("llama.cpp check skipped: the run's held-out split has no chat prompts")
        return
    echo(f"Running {report.path.name} in llama.cpp on {len(chats)} held-out prompts...")
    checked = verify_with_llama_cpp(report.path, source, chats, quant=report.quant, max_new_tokens=recipe.evaluation.max_new_tokens,
                                    batch_size=recipe.evaluation.batch_size)
    report.llama_cpp = checked.to_dict()
    report.passed = report.passed and checked.passed
