"""Commands over a recipe: validate, train, plan, preprocess and data preview."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from ftune.cli.app import RecipeArg, SetOption, app, user_errors
from ftune.errors import FtuneError


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
        code = launch(child, output_dir=Path(resolved.output_dir).expanduser().resolve(), nproc=nproc, nnodes=nnodes,
                      node_rank=node_rank, master_addr=master_addr, master_port=master_port)
        raise typer.Exit(code)
    from ftune.training.distributed import rank_process
    from ftune.training.run import is_main_process, run_training

    with rank_process():
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
