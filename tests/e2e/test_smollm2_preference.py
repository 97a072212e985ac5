"""The shipped DPO recipe on real SmolLM2-135M weights: held-out preference accuracy (the share of pairs whose
chosen answer the model ranks above the rejected one) rises by at least 20 points over the base."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO
from tests.conftest import invoke_ok as invoke

pytestmark = pytest.mark.slow


def test_shipped_dpo_recipe_raises_heldout_preference_accuracy(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe names its data relative to the repository
    out = tmp_path / "run"
    invoke("train", "recipes/smollm2-135m/dpo.yaml", "--set", f"output_dir={out}")
    result = invoke("eval", out, "--base")
    print(result.output)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    tuned, base = metrics["tuned"], metrics["base"]
    assert tuned["logprob_accuracy"] - base["logprob_accuracy"] >= 0.20
    assert tuned["preference_accuracy"] >= 0.8
