"""Commands that describe ftune itself: the recipe reference and JSON Schema, the methods and the model families."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ftune.cli.app import app, user_errors
from ftune.errors import FtuneError


@app.command()
def reference() -> None:
    """Print the recipe reference (every key, its type, default and meaning) as Markdown."""
    from ftune.recipe.reference import render_reference

    typer.echo(render_reference(), nl=False)


@app.command()
@user_errors
def schema(
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the schema to this file instead of printing it.",
                                          show_default=False),
) -> None:
    """Print the recipe's JSON Schema, so an editor validates and completes recipes: start a recipe with the line
    '# yaml-language-server: $schema=PATH' (VS Code's YAML extension and other YAML language servers read it)."""
    from ftune.recipe.json_schema import render_schema

    if output is None:
        typer.echo(render_schema(), nl=False)
        return
    from ftune.run_dir import write_text_atomic

    if output.is_dir():
        raise FtuneError(f"--output {output}: is a directory; name a file, e.g. {output / 'recipe.schema.json'}")
    write_text_atomic(output, render_schema())
    typer.echo(f"Schema: {output} (point a recipe at it with: # yaml-language-server: $schema={output})")


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
