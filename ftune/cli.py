"""The ``ftune`` command line: each lifecycle stage is a subcommand over one recipe or one run directory.

Thin by design: parse options, load the recipe or run directory, make one core call, say where the
output went. Heavy libraries are imported inside the commands that need them so ``ftune --help``
and ``ftune validate`` stay instant. User errors print one line each and exit 2, no traceback
unless ``--debug``.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from ftune import __version__
from ftune.errors import FtuneError
from ftune.gguf import DEFAULT_QUANT, GGUF_QUANTS

app = typer.Typer(
    name="ftune",
    help="Config-driven fine-tuning: one validated YAML recipe for train, eval, merge and export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": False}

RecipeArg = typer.Argument(..., help="Recipe YAML file.", show_default=False)
RunArg = typer.Argument(..., help="Run directory written by ftune train.", show_default=False)
ToolsOption = typer.Option(
    None, "--tools", help="JSON file with the tool schemas to offer; default: the tools the recipe gave its training data.",
    show_default=False,
)
SetOption = typer.Option([], "--set", help="Override a recipe key, e.g. --set training.learning_rate=1e-4 (repeatable).")


def user_errors(command: Callable) -> Callable:
    """Turn FtuneError (and Ctrl-C) into short messages and exit codes instead of tracebacks."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FtuneError as exc:
            if _state["debug"]:
                raise
            for problem in exc.problems:
                typer.echo(f"error: {problem}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; completed checkpoints are kept (continue with --resume)", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ftune {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    _state["debug"] = debug


@app.command()
@user_errors
def validate(recipe: Path = RecipeArg, overrides: List[str] = SetOption, quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing on success.")) -> None:
    """Check a recipe (schema and cross-field rules) without loading anything heavy; print the resolved recipe."""
    from ftune.hardware import preview_precision
    from ftune.resources import resolve_threads
    from ftune.recipe import load_recipe
    from ftune.run_dir import recipe_yaml

    resolved = load_recipe(recipe, overrides)
    if not quiet:
        typer.echo(recipe_yaml(resolved), nl=False)
        typer.echo(f"# {recipe}: OK", err=True)
        typer.echo(f"# training.mixed_precision: {preview_precision(resolved.training.mixed_precision)}", err=True)
        threads = resolve_threads(resolved.training.threads)
        typer.echo(f"# training.threads: {threads.count} ({threads.reason})", err=True)
        from ftune.recipe.distributed import describe_strategy

        typer.echo(f"# distributed.strategy: {describe_strategy(resolved.distributed)}; process count from the launch "
                   "(--nproc, torchrun, accelerate launch)", err=True)
    from ftune.families import untested_family_note

    if (note := untested_family_note(resolved.model.name_or_path)) is not None:
        typer.echo(f"# warning: {note}", err=True)


@app.command()
@user_errors
def train(
    recipe: Path = RecipeArg,
    overrides: List[str] = SetOption,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output_dir."),
    resume: bool = typer.Option(False, "--resume", help="Continue output_dir from its last checkpoint."),
    force: bool = typer.Option(False, "--force", help="Train even where the memory plan exceeds the free memory."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes on this machine (e.g. one per GPU), started by torch.distributed."),
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="Machines taking part; run the same command on each."),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="This machine's index among --nnodes (0 hosts the rendezvous)."),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="Address of the --node-rank 0 machine (several machines)."),
    master_port: int = typer.Option(29500, "--master-port", help="Port of the rendezvous on --master-addr."),
) -> None:
    """Fine-tune a model as the recipe says and write a run directory."""
    from ftune.training.launch import launch, launched_by_torch
    from ftune.recipe import load_recipe

    resolved = load_recipe(recipe, overrides)  # a recipe error stops here, before any process starts
    if (nproc > 1 or nnodes > 1) and not launched_by_torch():
        child = ["train", str(recipe), *[f"--set={item}" for item in overrides], *(["--overwrite"] if overwrite else []),
                 *(["--resume"] if resume else []), *(["--force"] if force else [])]
        code = launch(child, nproc=nproc, nnodes=nnodes, node_rank=node_rank, master_addr=master_addr, master_port=master_port)
        raise typer.Exit(code)
    from ftune.training.run import is_main_process, run_training

    run = run_training(resolved, overwrite=overwrite, resume=resume, force=force, echo=typer.echo)
    if is_main_process():
        typer.echo(f"Run directory: {run.root}")


@app.command()
@user_errors
def plan(
    recipe: Path = RecipeArg,
    overrides: List[str] = SetOption,
    probe: int = typer.Option(0, "--probe", min=0, help="Also train N steps with the recipe's settings and measure time and memory."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan (and probe) as JSON."),
) -> None:
    """Estimate memory (weights, gradients, optimizer, activations) and tokens per step from the model config alone."""
    import contextlib
    import json

    from ftune.hardware import cheap_device
    from ftune.resources import free_memory_mib
    from ftune.training.plan import format_plan, plan_recipe
    from ftune.training.probe import format_probe, run_probe
    from ftune.recipe import load_recipe

    resolved = load_recipe(recipe, overrides)
    device = cheap_device()
    # With --json, stdout carries the JSON alone; progress (a first GGUF import, probe steps) goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        estimate = plan_recipe(resolved, device=device)
        free = free_memory_mib(device) if device == "cpu" else None  # the GPU's free memory needs torch; train checks it
        report = {"plan": estimate.as_dict(), "free_mib": free}
        if not as_json:
            typer.echo(format_plan(resolved, estimate))
            if free is not None:
                verdict = "fits" if estimate.total_mib <= free else "does NOT fit (ftune train will refuse it without --force)"
                typer.echo(f"Free memory: {free:,.0f} MiB: {verdict}")
        if probe:
            result = run_probe(resolved, probe, echo=lambda line: typer.echo(line, err=True))
            report["probe"] = vars(result)
            if not as_json:
                typer.echo(format_probe(result, estimate))
    if as_json:
        typer.echo(json.dumps(report, indent=2))


@app.command()
@user_errors
def preprocess(recipe: Path = RecipeArg, overrides: List[str] = SetOption) -> None:
    """Tokenize the recipe's data into the cache now, so ftune train skips tokenization (tokenizer only, no weights)."""
    from ftune.recipe import load_recipe

    resolved = load_recipe(recipe, overrides)
    from ftune.training.run import run_preprocess

    splits = run_preprocess(resolved, echo=typer.echo)
    typer.echo(f"Cache: {splits.cache_path}")


data_app = typer.Typer(help="Inspect the recipe's data as training will see it.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("preview")
@user_errors
def data_preview(
    recipe: Path = RecipeArg,
    overrides: List[str] = SetOption,
    count: int = typer.Option(3, "-n", "--count", min=0, help="Examples to show."),
    split: str = typer.Option("train", "--split", help="'train' or 'eval'."),
) -> None:
    """Render examples with trained tokens highlighted and masked ones dimmed, then row/token/truncation counts."""
    import os

    from ftune.recipe import load_recipe

    if split not in ("train", "eval"):
        raise FtuneError(f"--split {split!r}: expected 'train' or 'eval'")
    resolved = load_recipe(recipe, overrides)
    from ftune.data.preview import run_preview

    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    run_preview(resolved, count=count, split=split, color=color, echo=typer.echo)


@app.command("eval")
@user_errors
def evaluate(
    run_dir: Path = RunArg,
    split: str = typer.Option("eval", "--split", help="'eval' (the recipe's held-out split) or a .jsonl/.json file."),
    base: bool = typer.Option(False, "--base", help="Also score the untuned base model and print the delta."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", min=1, help="Score at most N examples."),
    minimum: List[str] = typer.Option([], "--min", help="Fail (exit 1) if METRIC falls below VALUE, e.g. --min exact_match=0.5."),
) -> None:
    """Score the tuned model on held-out data (and the base model beside it with --base)."""
    from ftune.evaluate import check_thresholds, format_table, parse_thresholds, run_evaluation

    thresholds = parse_thresholds(minimum)
    report = run_evaluation(run_dir, split=split, with_base=base, max_samples=max_samples, echo=typer.echo)
    typer.echo(format_table(report))
    typer.echo(f"Metrics: {report.metrics_file}")
    failures = check_thresholds(report.tuned, thresholds)
    for failure in failures:
        typer.echo(f"below threshold: {failure}", err=True)
    if failures:
        raise typer.Exit(1)


@app.command()
@user_errors
def merge(
    run_dir: Path = RunArg,
    out: Optional[Path] = typer.Option(None, "--out", help="Folder to write; default RUN/merged."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Saved weight dtype: float32, bfloat16 or float16; default the recipe's model.dtype."),
) -> None:
    """Fold the adapter into the base weights and check the merged model reproduces the adapter model."""
    from ftune.merge import describe, run_merge

    report = run_merge(run_dir, out=out, dtype=dtype, echo=typer.echo)
    typer.echo(describe(report))
    if not report.passed:
        typer.echo(
            "error: the merged model strays from the adapter model beyond tolerance; nothing was written "
            "(if the drift is expected, e.g. with --dtype float16, raise merge.tolerance in the run's recipe.yaml)",
            err=True,
        )
        raise typer.Exit(1)
    typer.echo(f"Merged model: {report.path} (plain transformers folder; parity report in parity.json)")


@app.command()
@user_errors
def export(
    run_dir: Path = RunArg,
    format: str = typer.Option(..., "--format", help="safetensors or gguf."),
    quant: Optional[str] = typer.Option(None, "--quant", help=f"GGUF weight type: {', '.join(GGUF_QUANTS)} (default {DEFAULT_QUANT})."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output file (gguf) or folder (safetensors); default under RUN/export/."),
    verify: Optional[str] = typer.Option(None, "--verify", help="Also run a GGUF in this runtime and compare its replies: llama.cpp "
                                         "(needs pip install 'ftune[llamacpp]')."),
    prompts: int = typer.Option(16, "--prompts", min=1, help="Held-out prompts --verify compares replies on."),
) -> None:
    """Write the run's complete weights (merging first if needed) as GGUF or safetensors, verified by reloading."""
    from ftune.export import MergeParityError, run_export

    try:
        report = run_export(run_dir, format, quant=quant, out=out, verify=verify, prompts=prompts, echo=typer.echo)
    except MergeParityError as failed:
        typer.echo(f"error: cannot export: {failed}; nothing was written", err=True)
        raise typer.Exit(1) from None
    size = report.size_bytes / 2**20
    typer.echo(
        f"verification: max |logit diff| {report.max_abs_logit_diff:.3g} (tolerance {report.tolerance:.3g}), "
        f"next-token agreement {100 * report.next_token_agreement:.2f}%, size {size:.1f} MiB"
    )
    if report.writer_max_abs_logit_diff is not None:
        typer.echo(f"file vs the weights rounded as stored: max |logit diff| {report.writer_max_abs_logit_diff:.3g} "
                   f"(tolerance {report.writer_tolerance:.3g})")
    for note in report.notes:
        typer.echo(f"note: {note}", err=True)
    if report.llama_cpp:
        checked = report.llama_cpp
        typer.echo(f"llama.cpp: same reply as transformers on {checked['same_text']:.0%} of {checked['prompts']} prompts "
                   f"({'required: 100%' if checked['required'] else 'reported for a quantized file'}), same tokens "
                   f"{checked['same_tokens']:.0%}, stopped on EOS {checked['stopped_rate']:.0%}")
    if report.modelfile:
        typer.echo(f"Ollama: ollama create NAME -f {report.modelfile}" + (f" ({report.chat_layout} chat template)" if report.chat_layout else ""))
    if not report.passed:
        typer.echo(f"error: {report.path} does not reproduce the model (kept for inspection; do not deploy it)", err=True)
        raise typer.Exit(1)
    typer.echo(f"Exported: {report.path}")


@app.command()
@user_errors
def generate(
    run_dir: Path = RunArg,
    prompt: str = typer.Option(..., "--prompt", help="User message to reply to."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Cap on generated tokens."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy (deterministic); above 0 samples."),
    merged: bool = typer.Option(False, "--merged", help="Use RUN/merged (from ftune merge) instead of the adapter."),
    tools: Path = ToolsOption,
) -> None:
    """Reply to one prompt with the tuned model, streaming tokens; uses the training chat template and system prompt."""
    from ftune.data.formats import with_system_prompt
    from ftune.inference import load_for_generation, offered_tools, stream_reply

    model, tokenizer, recipe = load_for_generation(run_dir, merged=merged)
    messages = with_system_prompt([{"role": "user", "content": prompt}], recipe.data.system_prompt)
    stream_reply(model, tokenizer, messages, max_new_tokens=max_new_tokens, temperature=temperature,
                 tools=offered_tools(tools, recipe, tokenizer))


@app.command()
@user_errors
def chat(
    run_dir: Path = RunArg,
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Cap on generated tokens per reply."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy (deterministic); above 0 samples."),
    merged: bool = typer.Option(False, "--merged", help="Use RUN/merged (from ftune merge) instead of the adapter."),
    tools: Path = ToolsOption,
) -> None:
    """Talk to the tuned model: one line per turn, replies stream back; /reset forgets, /exit or Ctrl-D quits."""
    from ftune.inference import load_for_generation, offered_tools, run_chat

    model, tokenizer, recipe = load_for_generation(run_dir, merged=merged)
    typer.echo(f"Chatting with {run_dir} (/exit or Ctrl-D quits, /reset starts over)", err=True)
    run_chat(model, tokenizer, system_prompt=recipe.data.system_prompt, max_new_tokens=max_new_tokens, temperature=temperature,
             tools=offered_tools(tools, recipe, tokenizer))


@app.command()
def reference() -> None:
    """Print the recipe reference (every key, its type, default and meaning) as Markdown."""
    from ftune.recipe.reference import render_reference

    typer.echo(render_reference(), nl=False)


@app.command()
def methods() -> None:
    """Print the capability matrix: tasks, quantized bit widths, merge, gradient checkpointing and model needs per method."""
    from ftune.recipe import METHOD_CLASSES, method_names

    header = f"{'method':<12} {'tasks':<26} {'quantized':<10} {'mergeable':<10} {'grad-ckpt':<10} {'needs':<20} summary"
    typer.echo(header)
    for name, cls in zip(method_names(), METHOD_CLASSES):
        bits = ",".join(map(str, cls.quantized_base)) or "no"
        flags = ["yes" if flag else "no" for flag in (cls.mergeable, cls.gradient_checkpointing)]
        typer.echo(
            f"{name:<12} {', '.join(sorted(cls.tasks)):<26} {bits:<10} {flags[0]:<10} {flags[1]:<10} {cls.needs or '-':<20} {cls.summary}"
        )


@app.command()
def models() -> None:
    """Print the model-family matrix: which methods attach, GGUF export, mixture of experts (every cell is tested)."""
    from ftune.families import FAMILIES, MATRIX_COLUMNS, matrix_rows

    rows = [MATRIX_COLUMNS, *matrix_rows()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(MATRIX_COLUMNS) - 1)]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    encoders = ", ".join(model_type for model_type, family in FAMILIES.items() if not family.decoder)
    typer.echo(f"Encoders ({encoders}): classification with every method; sequential adapters.")


def main() -> None:
    app(prog_name="ftune")


if __name__ == "__main__":
    sys.exit(main())
