"""MAM and UniPELT on real SmolLM2-135M weights: their quickstart recipes lift exact match on the
held-out dates by at least 50 points over the untuned base (each run takes minutes on 2 cores)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO
from tests.conftest import invoke_ok as invoke

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("recipe", ["mam", "unipelt"])
def test_recipe_lifts_exact_match_by_fifty_points(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipes name their data relative to the repository
    run = tmp_path / "run"
    invoke("train", f"recipes/smollm2-135m/{recipe}.yaml", "--set", "training.save_steps=1000", "--set", f"output_dir={run}")
    invoke("eval", run, "--base")
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    # The README's methods table row: run with -s to see it.
    print(f"| `{recipe}` | {summary['trainable_share']:.2%} | {summary['wall_time_s'] / summary['steps']:.2f} | "
          f"{metrics['base']['exact_match']:.2f} -> {metrics['tuned']['exact_match']:.2f} |")
    assert metrics["tuned"]["exact_match"] - metrics["base"]["exact_match"] >= 0.5, metrics
