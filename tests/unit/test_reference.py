"""The committed recipe reference is the one the schema generates."""

from __future__ import annotations

from pathlib import Path

from ftune.recipe.reference import render_reference

DOC = Path(__file__).resolve().parents[2] / "docs" / "recipe-reference.md"


def test_reference_documents_every_key_with_its_description():
    text = render_reference()
    assert "| `training.learning_rate` | float | 0.0002 |" in text
    assert "## method: lora" in text and "| `method.r` | int | 16 |" in text


def test_committed_reference_is_current():
    assert DOC.read_text() == render_reference(), "regenerate with: ftune reference > docs/recipe-reference.md"
