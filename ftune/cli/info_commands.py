"""Commands that describe ftune itself: the recipe reference, the methods and the model families."""

from __future__ import annotations


import typer

from ftune.cli.app import app


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
