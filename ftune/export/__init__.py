"""Export stage: write a run's complete weights in a deployable format, and prove each export is faithful.

``run_export`` finds the run's complete weights (merging first when the run holds an adapter: the
one place a stage calls another) and hands them to a writer of ``FORMATS``. Every writer loads
back what it wrote and compares logits with the source model on a few token sequences, so a
scrambled export (a missed llama.cpp permutation, a bad quantization, a tokenizer that splits text
differently) shows up in the report instead of in production.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ftune.disk import explained, mib, report_file_size_limit, written_bytes
from ftune.errors import FtuneError
from ftune.export.writers import (
    LOGIT_TOLERANCE, ExportReport, export_gguf, export_gguf_lora, export_safetensors,
)
from ftune.gguf import DEFAULT_QUANT, UnsupportedExport, check_quant
from ftune.ollama import modelfile_path
from ftune.recipe.tasks import CLASSIFICATION
from ftune.run_dir import RunDir, load_run, run_lock, verification_report, write_json_atomic

__all__ = ["FORMATS", "LOGIT_TOLERANCE", "ExportReport", "MergeParityError", "export_gguf", "export_safetensors", "run_export"]


@dataclass(frozen=True)
class ExportFormat:
    write: Callable[..., ExportReport]  # (complete model folder, output path, **options) -> report
    default_name: Callable[[dict], str]  # output name under RUN/export/, from the options
    options: Callable[[str | None, Any, RunDir], dict]  # (--quant, recipe, run) -> the writer's options, refusing what does not apply
    companions: Callable[[Path, dict], list[Path]] = lambda target, options: []  # other files the writer puts in place


def _gguf_options(quant: str | None, recipe, run: RunDir) -> dict:
    if quant is not None:
        check_quant(quant)
    return {"quant": quant or DEFAULT_QUANT, "system_prompt": recipe.data.system_prompt}


def _gguf_lora_options(quant: str | None, recipe, run: RunDir) -> dict:
    from ftune.gguf_lora import check_lora_adapter
    from ftune.merge import load_merge_base

    check_lora_adapter(run.model, recipe.method.name)
    return {**_gguf_options(quant, recipe, run), "adapter_dir": run.model, "load_base": load_merge_base(recipe, run)}


def _base_files(target: Path, options: dict) -> list[Path]:
    from ftune.gguf_lora import base_gguf_path

    base = base_gguf_path(target, options["quant"])
    return [base, verification_report(base)]


def _no_quant(quant: str | None, recipe, run: RunDir) -> dict:
    if quant is not None:
        raise FtuneError("--quant applies to --format gguf only; safetensors keeps the merged weights' dtype")
    return {}


FORMATS: dict[str, ExportFormat] = {
    "safetensors": ExportFormat(export_safetensors, lambda options: "safetensors", _no_quant),
    "gguf": ExportFormat(export_gguf, lambda options: f"model-{options['quant']}.gguf", _gguf_options),
    "gguf-lora": ExportFormat(export_gguf_lora, lambda options: f"adapter-{options['quant']}.gguf", _gguf_lora_options, _base_files),
}
GGUF_FORMATS = ("gguf", "gguf-lora")


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
    if verify is not None and fmt not in GGUF_FORMATS:
        raise FtuneError(f"--verify {verify} runs GGUF files; add --format gguf or --format gguf-lora")
    export_format = FORMATS[fmt]
    run, recipe = load_run(run_dir)
    report_file_size_limit()
    options = export_format.options(quant, recipe, run)
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
                       cleanup=lambda: remove_export(target, since=started, also=export_format.companions(target, options))):
            report = export_format.write(source, target, **options)
            if verify == "llama.cpp":
                check_in_llama_cpp(report, run, recipe, source, prompts, echo=echo)
            write_json_atomic(verification_report(target), report.to_dict())
    return report


def remove_export(target: Path, *, since: float, also: list[Path] = ()) -> None:
    """After a failed write, remove what this export had already put in place (the weights without their Modelfile
    or report), so no half set of files passes for an export; an earlier export's files are left alone."""
    for path in (target, modelfile_path(target) if target.suffix == ".gguf" else None, verification_report(target), *also):
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
    model_file, lora, quant = report.path, None, report.quant
    if report.base_gguf:  # gguf-lora: llama.cpp loads the base file and applies the adapter at run time
        model_file, lora = Path(report.base_gguf), report.path
        quant = json.loads(verification_report(model_file).read_text(encoding="utf-8"))["quant"]
    checked = verify_with_llama_cpp(model_file, source, chats, quant=quant, max_new_tokens=recipe.evaluation.max_new_tokens,
                                    batch_size=recipe.evaluation.batch_size, lora=lora)
    report.llama_cpp = checked.to_dict()
    report.passed = report.passed and checked.passed
