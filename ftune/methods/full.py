"""Methods that train the model's own parameters (no extra modules): full fine-tuning."""

from __future__ import annotations

from pathlib import Path


def apply_full(model, config, task: str):
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def save_full(model, directory: Path) -> None:
    model.save_pretrained(directory)


def load_full(load_base, directory: Path):
    # The run directory holds complete weights: load them with the base's loader settings
    # (dtype, task head) but from the run directory instead of the original source.
    return load_base(location=str(directory))
