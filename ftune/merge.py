"""Merge stage: fold a run's adapter into its base weights, and prove the result computes what the adapter did.

The merged folder is a plain transformers model (safetensors, tokenizer with the training chat
template, generation config) that loads without peft or ftune. It is built in a staging folder,
loaded back with plain transformers and compared with the unmerged adapter model on eval prompts;
only when the logits agree within tolerance is it renamed into place. A write that fails for lack of
room (a full disk, a quota, the file-size limit) is one line, and leaves no partial folder behind.

A quantized (QLoRA) run is merged into the base reloaded in full precision by default: folding
an adapter into 4-bit weights re-quantizes them and shifts logits by ~0.1. ``merge.base:
dequantized`` instead folds it into the dequantized 4-bit weights, which reproduces the model
that was trained and evaluated, quantization error included.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ftune.disk import explained, mib, report_file_size_limit
from ftune.errors import FtuneError
from ftune.recipe import Recipe, method_class
from ftune.recipe.schema import QuantizationConfig
from ftune.recipe.tasks import TASKS
from ftune.run_dir import RunDir, atomic_dir, load_run, run_lock, write_json_atomic

MERGE_DTYPES = ("float32", "bfloat16", "float16")
# Default parity tolerance, as a fraction of the largest |reference logit| (see ftune.parity). Measured on a SmolLM2 LoRA run: float32 2e-6 (rounding
# only), float16 3.6e-3, bfloat16 3.5e-2 (the reloaded model also computes in that dtype). A
# wrong scale or a missed module shifts logits by a large fraction of the scale.
RELATIVE_TOLERANCE = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-1}
# Against a reference that runs on quantized weights (merge.base: dequantized): bitsandbytes' 4-bit
# kernels round differently from a float32 matmul over the same dequantized weights (measured
# 3e-3 to 6e-3 of the logit scale on CPU), so the merged model can match it only that closely. Merging
# into the full-precision base instead lands ~0.3 of the scale away from the 4-bit model.
QUANTIZED_REFERENCE_TOLERANCE = 2e-2


@dataclass
class MergeReport:
    """Parity of the merged model with the adapter model it replaces; ``tolerance`` is absolute."""

    path: Path | None  # None when parity failed and nothing was written
    task: str
    method: str
    base: str
    bits: int | None  # quantization of the trained base
    dtype: str
    prompts: int
    max_abs_logit_diff: float
    next_token_agreement: float
    tolerance: float
    passed: bool
    wall_time_s: float = 0.0
    # Quantized runs merged in full precision: how far the merged model is from the quantized model
    # that was trained and evaluated (information, not a failure).
    vs_quantized_max_abs_logit_diff: float | None = None
    vs_quantized_next_token_agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path) if self.path else None}


class _ParityFailed(Exception):
    def __init__(self, report: MergeReport) -> None:
        self.report = report


def check_mergeable(recipe: Recipe) -> None:
    cls = method_class(recipe.method.name)
    if not cls.mergeable:
        raise FtuneError(f"method '{recipe.method.name}' cannot be merged into the base weights: {cls.unmergeable_hint}")


def default_dtype(recipe: Recipe) -> str:
    from ftune.model import resolve_dtype

    if recipe.model.dtype != "auto":
        return recipe.model.dtype
    return str(resolve_dtype("auto")).removeprefix("torch.")


def resolve_target(run: RunDir, out: str | Path | None) -> Path:
    target = Path(out).expanduser().resolve() if out else run.merged
    # Replacing an earlier merge is fine; replacing anything else is not.
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not run.parity_report(target).is_file())):
        raise FtuneError(f"--out: {target} exists and is not an earlier merge; pick a new folder")
    return target


def fold_adapter(model):
    """The base model with the adapter's update added to its weights (peft ``merge_and_unload``)."""
    merge = getattr(model, "merge_and_unload", None)
    if merge is None:
        raise FtuneError(f"the trained {type(model).__name__} has no merge_and_unload; this method cannot be merged")
    return merge(safe_merge=True)


def load_merge_base(recipe: Recipe, run: RunDir):
    """A zero-argument loader of the float32 weights the adapter is folded into."""
    from ftune.tuned import base_loader

    if recipe.merge.base == "dequantized":
        load_quantized = base_loader(recipe, run)
        return lambda **kwargs: load_quantized(**kwargs).dequantize().float()
    return base_loader(recipe, run, quantization=QuantizationConfig(), dtype="float32")


def load_reference(recipe: Recipe, run: RunDir):
    """The unmerged adapter model the merged one must reproduce: on the same float32 base, or on the
    quantized base as trained when merging into its dequantized weights."""
    from ftune.methods import load_trained
    from ftune.tuned import base_loader

    if recipe.merge.base == "dequantized":
        loader = base_loader(recipe, run)
    else:
        loader = base_loader(recipe, run, quantization=QuantizationConfig(), dtype="float32")
    return load_trained(recipe.method.name, loader, run.model).eval()


def save_merged(model, tokenizer, directory: Path, dtype: str) -> None:
    """A plain model folder: weights in ``dtype``, tokenizer and chat template, generation config."""
    import torch

    model = model.to(getattr(torch, dtype))
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # sequence classifiers find the last token by it
    generation = getattr(model, "generation_config", None)  # classifiers have none
    if generation is not None and tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id
    if generation is not None and tokenizer.eos_token_id is not None:
        from ftune.data.templates import end_of_turn_ids

        # Training taught the model to end a reply with the template's end-of-turn token; plain
        # generate() stops only at ids listed here.
        stops = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
        stops = [i for i in stops if i is not None]
        generation.eos_token_id = stops + [i for i in end_of_turn_ids(tokenizer) if i not in stops]
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def run_merge(run_dir, *, out: str | Path | None = None, dtype: str | None = None, echo=print) -> MergeReport:
    """Merge ``RUN/model`` into its base and write ``out`` (default ``RUN/merged``) if parity holds.

    Returns the report either way; ``report.passed`` is False (and nothing was written) when the
    merged model's logits stray beyond tolerance.
    """
    run, recipe = load_run(run_dir)
    report_file_size_limit()
    with run_lock(run.root, echo=echo):
        return merge_into(run, recipe, out=out, dtype=dtype, echo=echo)


def merge_into(run: RunDir, recipe: Recipe, *, out, dtype, echo) -> MergeReport:
    import torch
    from transformers import AutoTokenizer

    from ftune.data.heldout import load_heldout, parity_inputs
    from ftune.methods import load_trained
    from ftune.parity import compare_logits, logit_scale
    from ftune.runtime import quiet_libraries
    from ftune.tuned import load_model, load_plain_model

    if run.has_complete_weights():
        raise FtuneError(
            f"{run.root}: the run already holds complete weights in {run.model} (method '{recipe.method.name}'); "
            f"nothing to merge: export them with ftune export {run.root} --format safetensors|gguf"
        )
    check_mergeable(recipe)
    dtype = dtype or default_dtype(recipe)
    if dtype not in MERGE_DTYPES:
        raise FtuneError(f"--dtype {dtype!r}: expected one of {', '.join(MERGE_DTYPES)}")
    target = resolve_target(run, out)
    quiet_libraries()
    clock = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(run.model)
    inputs = parity_inputs(tokenizer, load_heldout(run, recipe), recipe.data, recipe.merge.parity_samples)
    where = "dequantized trained base" if recipe.merge.base == "dequantized" else "full-precision base"
    echo(f"Merging the {recipe.method.name} adapter into the {where} ({dtype})...")
    merged = fold_adapter(load_trained(recipe.method.name, load_merge_base(recipe, run), run.model))
    reference = load_reference(recipe, run)
    relative = recipe.merge.tolerance or RELATIVE_TOLERANCE[dtype]
    if recipe.merge.base == "dequantized" and not recipe.merge.tolerance:
        relative = max(relative, QUANTIZED_REFERENCE_TOLERANCE)
    tolerance = relative * logit_scale(reference, inputs)
    size = sum(p.numel() for p in merged.parameters()) * getattr(torch, dtype).itemsize
    try:
        with explained(target, needs=f"the merged model needs about {mib(size)}"), atomic_dir(target) as staging:
            save_merged(merged, tokenizer, staging, dtype)
            del merged
            candidate = load_plain_model(staging, recipe.task)
            parity = compare_logits(reference, candidate, inputs)
            diff, agreement = parity.max_abs_diff, parity.agreement
            report = MergeReport(
                path=target, task=recipe.task, method=recipe.method.name, base=recipe.merge.base, bits=recipe.quantization.bits, dtype=dtype, prompts=len(inputs),
                max_abs_logit_diff=diff, next_token_agreement=agreement, tolerance=tolerance, passed=diff <= tolerance,
            )
            if recipe.quantization.bits and recipe.merge.base == "full_precision":
                del reference
                trained, _ = load_model(run, recipe)
                versus = compare_logits(trained, candidate, inputs)
                report.vs_quantized_max_abs_logit_diff, report.vs_quantized_next_token_agreement = versus.max_abs_diff, versus.agreement
            report.wall_time_s = time.perf_counter() - clock
            if not report.passed:
                report.path = None
                raise _ParityFailed(report)
            write_json_atomic(run.parity_report(staging), report.to_dict())
    except _ParityFailed as failed:
        return failed.report
    return report


def describe(report: MergeReport) -> str:
    lines = [
        f"parity on {report.prompts} eval prompts: max |logit diff| {report.max_abs_logit_diff:.3g} "
        f"(tolerance {report.tolerance:.3g}), {TASKS[report.task].agreement} agreement {100 * report.next_token_agreement:.2f}%"
    ]
    if report.vs_quantized_max_abs_logit_diff is not None:
        lines.append(
            f"the quantized model that was trained differs from the merged one by max |logit diff| "
            f"{report.vs_quantized_max_abs_logit_diff:.3g}, agreement {100 * report.vs_quantized_next_token_agreement:.2f}% "
            "(the trained model's quantization error" + ("; merge.base: dequantized reproduces it instead)" if report.bits == 4 else ")")
        )
    return "\n".join(lines)
