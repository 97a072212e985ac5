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
    from ftune.recipe import load_recipe
    from ftune.run_dir import recipe_yaml

    resolved = load_recipe(recipe, overrides)
    if not quiet:
        typer.echo(recipe_yaml(resolved), nl=False)
        typer.echo(f"# {recipe}: OK", err=True)


@app.command()
@user_errors
def train(
    recipe: Path = RecipeArg,
    overrides: List[str] = SetOption,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output_dir."),
    resume: bool = typer.Option(False, "--resume", help="Continue output_dir from its last checkpoint."),
) -> None:
    """Fine-tune a model as the recipe says and write a run directory."""
    from ftune.recipe import load_recipe

    resolved = load_recipe(recipe, overrides)
    from ftune.train import run_training

    run = run_training(resolved, overwrite=overwrite, resume=resume, echo=typer.echo)
    typer.echo(f"Run directory: {run.root}")


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
def methods() -> None:
    """Print the capability matrix: tasks, quantized bases, merge and gradient checkpointing per method."""
    from ftune.recipe import METHOD_CLASSES, method_names

    header = f"{'method':<12} {'tasks':<28} {'quantized':<10} {'mergeable':<10} {'grad-ckpt':<10} summary"
    typer.echo(header)
    for name, cls in zip(method_names(), METHOD_CLASSES):
        flags = ["yes" if flag else "no" for flag in (cls.quantized_base, cls.mergeable, cls.gradient_checkpointing)]
        typer.echo(f"{name:<12} {', '.join(sorted(cls.tasks)):<28} {flags[0]:<10} {flags[1]:<10} {flags[2]:<10} {cls.summary}")


def main() -> None:
    app(prog_name="ftune")


if __name__ == "__main__":
    sys.exit(main())
