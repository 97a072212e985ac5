"""Commands over a run directory: eval (and benchmarks), merge, export, push, generate and chat."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ftune.cli.app import RunArg, ToolsOption, app, user_errors
from ftune.errors import FtuneError
from ftune.gguf import DEFAULT_QUANT, GGUF_QUANTS


@app.command("eval")
@user_errors
def evaluate(
    run_dir: Path = RunArg,
    split: str = typer.Option("eval", "--split", help="'eval' (the recipe's held-out split) or a .jsonl/.json file."),
    base: bool = typer.Option(False, "--base", help="Also score the untuned base model and print the delta."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", min=1, help="Score at most N examples."),
    minimum: List[str] = typer.Option([], "--min", help="Fail (exit 1) if METRIC falls below VALUE, e.g. --min exact_match=0.5."),
    benchmark: Optional[str] = typer.Option(
        None, "--benchmark", help="Score lm-evaluation-harness TASKS instead (comma-separated; the shipped ftune_dates runs "
        "offline); needs pip install 'ftune\\[benchmark]'. --max-samples limits each task.", show_default=False),
    merged: bool = typer.Option(False, "--merged", help="With --benchmark: score RUN/merged (ftune merge) instead of the adapter."),
) -> None:
    """Score the tuned model on held-out data or benchmarks (and the base model beside it with --base)."""
    from ftune.evaluate import check_thresholds, format_table, parse_thresholds, run_evaluation

    thresholds = parse_thresholds(minimum)
    if benchmark is not None:
        from ftune.benchmark import parse_tasks, run_benchmark

        if split != "eval":
            raise FtuneError("--split and --benchmark exclude each other: a benchmark brings its own data")
        report = run_benchmark(run_dir, parse_tasks(benchmark), with_base=base, merged=merged, limit=max_samples, echo=typer.echo)
    elif merged:
        raise FtuneError("--merged applies with --benchmark; ftune eval scores the model as trained (after ftune merge, the same)")
    else:
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
    format: str = typer.Option(..., "--format", help="safetensors, gguf, or gguf-lora (a LoRA run's adapter as a llama.cpp "
                               "adapter file, with the base GGUF beside it)."),
    quant: Optional[str] = typer.Option(None, "--quant", help=f"GGUF weight type: {', '.join(GGUF_QUANTS)} (default {DEFAULT_QUANT})."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output file (gguf) or folder (safetensors); default under RUN/export/."),
    verify: Optional[str] = typer.Option(None, "--verify", help="Also run a GGUF in this runtime and compare its replies: llama.cpp "
                                         "(needs pip install 'ftune\\[llamacpp]')."),
    prompts: int = typer.Option(16, "--prompts", min=1, help="Held-out prompts --verify compares replies on."),
) -> None:
    """Write the run's complete weights (merging first if needed) as GGUF or safetensors, or a LoRA adapter as a GGUF adapter
    beside its base, verified by reloading."""
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
    typer.echo(f"Exported: {report.path}" + (f" (adapter; base {report.base_gguf})" if report.base_gguf else ""))


@app.command()
@user_errors
def push(
    run_dir: Path = RunArg,
    repo: str = typer.Option(..., "--repo", help="OWNER/NAME of the Hub model repository; created if missing.", show_default=False),
    what: Optional[str] = typer.Option(None, "--what", help="adapter, merged or gguf (RUN/export/*.gguf); default the adapter, "
                                       "or the complete weights of a full fine-tune.", show_default=False),
    private: bool = typer.Option(False, "--private", help="Create the repository private."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to commit to (created if missing); default main.",
                                           show_default=False),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the files and the model card; contact nothing."),
) -> None:
    """Publish the run on the Hugging Face Hub with a model card written from the run directory (needs hf auth login)."""
    from ftune.hub import describe_plan, plan_push, upload

    plan = plan_push(run_dir, repo, what)
    typer.echo(describe_plan(plan, private=private, revision=revision))
    if dry_run:
        typer.echo(f"--- {plan.listing()[0][0]} ---\n{plan.card}", nl=False)
        return
    typer.echo(f"Pushed: {upload(plan, private=private, revision=revision, echo=typer.echo)}")


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
