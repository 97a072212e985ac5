"""The Typer app, its global options, the arguments commands share, and how a user error becomes one line and exit 2."""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable

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


def main() -> None:
    # Local-first: the libraries' usage pings (TRL's trainers send one per trainer built) stay off unless the user
    # turns them on (HF_HUB_DISABLE_TELEMETRY=0); huggingface_hub reads the variable once, when it is first imported.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # bitsandbytes, imported with transformers, asks the Hub for a 4-bit CPU kernel on AVX512-BF16 CPUs (kernels'
    # get_kernel, then downloads and runs it): code no one asked for, or a wait on a network that is not there. Pointing
    # kernels' local override for that repository at nothing makes the lookup fail at once, and bitsandbytes takes its own
    # CPU path, as wherever that kernel is missing; its notice about it is kept out of the output.
    os.environ.setdefault("LOCAL_KERNELS", f"{BNB_CPU_KERNEL}=/nonexistent/ftune-uses-no-hub-kernels")
    for noisy in ("bitsandbytes", "kernels"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    app(prog_name="ftune")


BNB_CPU_KERNEL = "kernels-community/quantization-bitsandbytes"
